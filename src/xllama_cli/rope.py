"""Rotary position embeddings: one registry of frequency rules, one way to apply them.

Each rule turns (config, seq_len) into inverse frequencies; the formulas follow the published
definitions (and transformers' implementations, which the tests compare against).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .config import ROPE_RULES, ModelConfig
from .errors import SettingError, XllamaError

InvFreqFn = Callable[[ModelConfig, "int | torch.Tensor"], torch.Tensor]


def _base_inv_freq(base: float | torch.Tensor, dim: int,
                   device: torch.device | None = None) -> torch.Tensor:
    device = base.device if isinstance(base, torch.Tensor) else device
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    return 1.0 / (base ** exponents)


def rotary(cfg: ModelConfig, seq_len: int | torch.Tensor) -> torch.Tensor:
    return _base_inv_freq(cfg.rope_theta, cfg.head_dim)


def linear(cfg: ModelConfig, seq_len: int) -> torch.Tensor:
    """Position interpolation: positions divided by `factor`."""
    return rotary(cfg, seq_len) / float(cfg.rope_scaling["factor"])


def dynamic(cfg: ModelConfig, seq_len: int | torch.Tensor) -> torch.Tensor:
    """NTK-aware scaling: past the trained length the base grows with the sequence. seq_len may
    be a 0-d tensor on the model's device: both rules are computed and one is selected there, so
    the forward pass never reads a length back to the host nor branches on it."""
    max_pos = cfg.max_seq_len
    factor = float(cfg.rope_scaling["factor"])
    d = cfg.head_dim
    # float32 tensor arithmetic, as transformers does it, so the frequencies agree to the last bit;
    # the clamp only keeps the unselected rule finite at or below the trained length
    n = torch.as_tensor(seq_len, dtype=torch.int64)
    stretch = (factor * n.clamp(min=max_pos) / max_pos) - (factor - 1)
    base = cfg.rope_theta * stretch ** (d / (d - 2))
    plain = _base_inv_freq(cfg.rope_theta, d, n.device)  # rotary's
    return torch.where(n > max_pos, _base_inv_freq(base, d), plain)


def llama3(cfg: ModelConfig, seq_len: int) -> torch.Tensor:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth band between."""
    s = cfg.rope_scaling
    inv_freq = rotary(cfg, seq_len)
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


ROPE_REGISTRY: dict[str, InvFreqFn] = {
    "rotary": rotary,
    "linear": linear,
    "dynamic": dynamic,
    "llama3": llama3,
}


def with_rope(cfg: ModelConfig, name: str | None, factor: float | None) -> ModelConfig:
    """Override the checkpoint's RoPE rule (`name`) and scaling factor."""
    if factor is not None and not ROPE_RULES["factor"].ok(factor):
        raise XllamaError(f"rope factor must be {ROPE_RULES['factor'].allowed}, got {factor}")
    if name is None:
        if factor is not None:
            if cfg.rope_scaling is None:
                raise SettingError("{rope_factor} needs {rope} linear|dynamic|llama3 "
                                   "(the checkpoint uses plain rotary)")
            return cfg.replace(rope_scaling={**cfg.rope_scaling, "factor": float(factor)})
        return cfg
    if name not in ROPE_REGISTRY:
        raise SettingError("unknown {rope} {value!r}; choose one of: {valid}",
                           value=name, valid=", ".join(ROPE_REGISTRY))
    if name == "rotary":
        return cfg.replace(rope_scaling=None)
    old = cfg.rope_scaling or {}
    if factor is None:
        factor = old.get("factor") if old.get("rope_type") == name else None
    if factor is None:
        raise SettingError("{rope} {name} needs {rope_factor} F (e.g. 2.0)", name=name)
    scaling = {"rope_type": name, "factor": float(factor)}
    if name == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=cfg.max_seq_len)
    return cfg.replace(rope_scaling=scaling)


class RotaryEmbedding(nn.Module):
    """Holds the inverse frequencies and turns positions [B, T] into cos, sin [B, 1, T, head_dim]
    in the form apply_rope takes."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rule = ROPE_REGISTRY[cfg.rope_type]
        # a few numbers, computed on the CPU also when the model is built on the meta device: there
        # arithmetic runs torch's Python references, whose import of torch._dynamo slows start-up
        with torch.device("cpu"):
            inv_freq = self.rule(cfg, 0)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every position's angles, computed in float32 (as transformers does)
        then given in `dtype`, the activations', once for every layer and head: broadcast over
        the heads, and sin's first half negated, which is rotate_half's sign (see apply_rope)."""
        inv_freq = self.inv_freq
        if self.cfg.rope_type == "dynamic":
            # the base depends on each row's length so far (its largest position + 1), computed
            # per row on the device, as transformers computes one sequence's
            lengths = positions.max(dim=1).values + 1
            inv_freq = torch.stack([self.rule(self.cfg, n) for n in lengths.unbind()])
        inv_freq = inv_freq.expand(positions.shape[0], -1) if inv_freq.dim() == 1 else inv_freq
        freqs = positions.to(torch.float32)[:, :, None] * inv_freq[:, None, :]
        cos, sin = freqs.cos(), freqs.sin()
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D] in HF's half-split order; cos, sin: RotaryEmbedding's, [B, 1, T, D].
    transformers' x * cos + rotate_half(x) * sin, rotate_half(x) being (-x2, x1): with the sign
    in sin, the halves need only swapping (and -a * b is a * -b, to the bit)."""
    return x * cos + swap_halves(x) * sin
