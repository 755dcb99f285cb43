"""Next-token choice: greedy, temperature, top-k, top-p; seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import XllamaError, is_real, is_whole


@dataclass
class Sampling:
    """How the next token is chosen. Every value is checked here, so the command line and the
    Python API accept the same values and give them the same meaning."""

    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1: off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise XllamaError(f"temperature {self.temperature} is out of range: it must be a "
                              "finite number >= 0 (0 means greedy)")
        if self.top_k is not None and (not is_whole(self.top_k) or self.top_k < 0):
            raise XllamaError(f"top-k {self.top_k} is out of range: it must be a whole number >= 0 "
                              "(0 means off)")
        if self.top_p is not None and (not is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise XllamaError(f"top-p {self.top_p} is out of range: it must be > 0 and <= 1 "
                              "(1 means off)")
        if self.seed is not None and (not is_whole(self.seed) or not 0 <= self.seed < 2**64):
            raise XllamaError(f"seed {self.seed} is out of range: it must be a whole number from 0 "
                              "to 2**64 - 1")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set of mass top-p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first one always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, s: Sampling,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / s.temperature, s.top_k, s.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(s: Sampling, device: torch.device) -> torch.Generator | None:
    if s.temperature <= 0:
        return None
    g = torch.Generator(device=device)
    if s.seed is not None:
        g.manual_seed(s.seed)
    else:
        g.seed()
    return g
