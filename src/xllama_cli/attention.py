"""Causal self-attention with any number of K/V heads dividing the query heads (MHA, GQA, MQA)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .rope import apply_rope


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias or cfg.qkv_bias  # Qwen2 has q/k/v biases and no o_proj bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attention_bias)
        self.qkv: nn.Module | None = None  # one product giving q and k, then v, if fuse.py gave one
        self.kv_cache: KVCache | None = None
        # a one-token step in one call (cpu_attention.py), where one was given: it takes the
        # stacked q/k/v output, RoPE's cos and sin, the cache and where the token goes in it
        self.fused_step: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, start: int | torch.Tensor | None, row: int = 0,
                span: int | None = None) -> torch.Tensor:
        """x: [B, T, dim]. mask: bool [B, 1, T, S] (True = may attend) or None for plain causal.
        start, row, span: where x goes in the cache (KVCache.update); start None: no cache."""
        B, T, _ = x.shape
        if T == 1 and self.fused_step is not None and start is not None:
            assert self.kv_cache is not None, "call model.setup_cache() before using start="
            y = self.fused_step(self.qkv.layer(x), cos, sin, self.kv_cache, start, row)
            return self.o_proj(y)
        if self.qkv is not None:  # q and k as one output: RoPE turns both at once
            qk, v = self.qkv(x)
            qk = qk.view(B, T, self.n_heads + self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(qk, cos, sin).split((self.n_heads, self.n_kv_heads), 1)
        else:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            v = self.v_proj(x)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if start is not None:
            assert self.kv_cache is not None, "call model.setup_cache() before using start="
            k, v = self.kv_cache.update(start, k, v, row, span)
        if T == 1 and (q.device.type != "cpu" or q.dtype != torch.float32):
            y = decode_attention(q, k, v, mask)
        else:  # enable_gqa: the kernel shares each K/V head across its group instead of copying it
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row, q [B, H, 1, D] over k, v [B, n_kv, S, D], as two batched
    products with the softmax in float32; mask: bool [B|1, 1, 1, S] or None (every slot).

    On the CPU, ATen's flash-attention kernel is several times slower on one half-precision query:
    it is built for long queries. (In float32 it is as fast as this; benchmarks/decode.py measures
    both.) On CUDA, SDPA's fused kernels refuse a masked query over grouped K/V heads in most of
    the torch releases this runs on (flash takes no mask, memory-efficient long took no K/V
    groups, cuDNN's is first choice only on the newest GPUs), and its math fallback copies each
    K/V head once per query head, in float32: this reads each head once on any torch. The query
    heads of a group share their K/V head as the columns of one product; the scores are k @ q.T,
    so that the cache, a slice of a longer buffer, is the product's untransposed operand and is
    read in place rather than copied."""
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    grouped = q.view(B, n_kv, H // n_kv, D).transpose(-1, -2)
    scores = torch.matmul(k, grouped).transpose(-1, -2).float()
    scores = scores * D ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v).view(B, H, 1, D)
