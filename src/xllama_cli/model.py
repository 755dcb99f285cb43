"""The Llama transformer: embeddings, blocks, norm, head, from plain layers (nn.Linear, SDPA).
Parameter names are Hugging Face's. Kernels, int8, tensor parallelism and compilation are applied
to a built model from outside (linear.py, quantize.py, fuse.py, parallel.py,
generation.compile_decode)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import ModelConfig
from .kv_cache import KVCache
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the weights' dtype, as the reference does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)
        self.gate_up: nn.Module | None = None  # one product for gate and up, if fuse.py gave one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.window = cfg.layer_window(index)  # which of the forward's masks this layer takes
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        # a one-token step in one call (cpu_block.py), where one was given: it takes x, RoPE's
        # cos and sin and where the token goes in the cache, and gives None where it does not
        # serve x (more rows than its products' few)
        self.fused_step: Callable[..., torch.Tensor | None] | None = None

    def forward(self, x, cos, sin, mask, start, row=0, span=None):
        if self.fused_step is not None and start is not None and x.shape[1] == 1:
            y = self.fused_step(x, cos, sin, start, row)
            if y is not None:
                return y
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start, row, span)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Everything but the head; named `model` inside Transformer, as in HF checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # on the meta device (every load builds there) nothing is to be initialised, and normal_
        # there runs torch's Python reference, whose import of torch._dynamo slows start-up
        meta = torch.get_default_device().type == "meta"
        weight = torch.empty(cfg.vocab_size, cfg.dim) if meta else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=weight)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.rotary = RotaryEmbedding(cfg)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        # the windows the layers use, each once (None: none)
        self.windows = tuple(dict.fromkeys(layer.window for layer in self.model.layers))

    def init_rope(self, device: torch.device | str) -> None:
        """(Re)compute the RoPE frequencies on `device`, e.g. after building on the meta device."""
        self.model.rotary = RotaryEmbedding(self.config).to(device)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- the activations' dtype ----
    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype the model computes in between its products: its norms' (the weights' own,
        unless compute_in changed it)."""
        return self.model.norm.weight.dtype

    def compute_in(self, dtype: torch.dtype) -> None:
        """Compute the activations in `dtype` whatever the weights' (float32 beside
        half-precision weights, as llama.cpp does on the CPU: elementwise work in half precision
        costs more there than the rounding it saves). The norms' weights and the linear layers'
        biases are converted, each embedding row as it is looked up, and the KV cache follows;
        the linear layers must take such inputs (linear.use_cpu_kernels's do)."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.data = module.weight.data.to(dtype)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.data = bias.data.to(dtype)

    # ---- KV cache ----
    @property
    def cache(self) -> KVCache | None:
        """The first layer's cache: every layer's is set up, grown and cleared with it."""
        return self.model.layers[0].self_attn.kv_cache

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Make room for `batch` sequences of `max_len` tokens. A cache for as many sequences is
        kept: as it is when it has the room (its old slots are overwritten or masked), else grown
        to `max_len` slots with its contents kept, so a conversation goes on where it was. Any
        other cache is freed before the new one is allocated. Callers size `max_len` with
        kv_cache.cache_capacity."""
        cfg, p = self.config, self.model.embed_tokens.weight  # the head may be int8
        dtype, cache = self.activation_dtype, self.cache
        if cache is not None and cache.k.shape[0] == batch and cache.k.dtype == dtype:
            if cache.max_len < max_len:
                for layer in self.model.layers:
                    layer.self_attn.kv_cache.grow(max_len)
            return
        self.clear_cache()
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim,
                                               dtype, p.device)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    @property
    def cache_len(self) -> int:
        return 0 if self.cache is None else self.cache.max_len

    def forward(self, tokens: torch.Tensor, start: int | torch.Tensor | None = None,
                last_only: bool = False, *, row: int = 0, span: int | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (float32). Row b's tokens go to cache row row+b.

        start: where the tokens go in the cache, and so their positions:
            None: no cache; positions 0..T-1.
            int: every row's tokens at slots start..start+T-1 (a prefill, or rows decoding in
                step); attention over slots 0..start+T-1.
            [B] tensor: row b's tokens at slots start[b].. (rows at their own positions, as the
                engine decodes them); attention over slots 0..span-1, each row masked to the
                slots it has filled. A tensor keeps the compiled step's shapes static.
        span: with a tensor start, how many cache slots attention spans (more than any row's
            last slot; the host knows each row's length, so the model never reads `start`).
        last_only: compute logits for the last position only (generation needs no more).
        """
        B, T = tokens.shape
        steps = torch.arange(T, device=tokens.device)
        if isinstance(start, torch.Tensor):
            assert span is not None, "a tensor start needs the span of slots to attend over"
            slots = start[:, None] + steps  # [B, T]: each row its own
            keys = span
        else:
            slots = steps + (start or 0)  # [T]: the same for every row
            keys = (start or 0) + T
        positions = slots.expand(B, T)
        dtype = self.activation_dtype
        cos, sin = self.model.rotary(positions, dtype)
        # one mask per window the layers use (a sliding window, or none); every cached key is
        # kept, and a key that has left a layer's window is masked
        masks = {w: self._mask(slots, keys, w) for w in self.windows}
        x = self.model.embed_tokens(tokens).to(dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, masks[layer.window], start, row, span)
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x).float()

    @staticmethod
    def _mask(slots: torch.Tensor, keys: int, window: int | None = None) -> torch.Tensor | None:
        """Bool [B|1, 1, T, keys] (True: may attend), or None where SDPA's own causal rule (or no
        rule) is exact. slots: [T], the same for every row, or [B, T], each row's own.
        window: a query attends to the `window` slots up to its own, itself included."""
        T = slots.shape[-1]
        if slots.dim() == 1 and (window is None or keys <= window) and (keys == T or T == 1):
            return None  # causal from slot 0 (is_causal), or one query over every filled slot
        key = torch.arange(keys, device=slots.device)
        mask = key <= slots[..., None]  # causal: [T, S] or [B, T, S]
        if window is not None:
            mask = mask & (key > slots[..., None] - window)
        return mask[:, None] if slots.dim() == 2 else mask[None, None]
