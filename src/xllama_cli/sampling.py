"""Next-token choice: penalties, then greedy, or temperature with top-k, top-p and min-p; seeded.
One implementation for the command line and the API; the engine keeps one `Sampler` a sequence."""

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
    min_p: float | None = None  # None or 0: off
    # transformers' rule over the prompt and the output: a seen token's logit is divided by it
    # (multiplied when negative); 1: off
    repetition_penalty: float = 1.0
    # OpenAI's rule over the output: logit - frequency * count - presence * (count > 0); 0: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

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
        if self.min_p is not None and (not is_real(self.min_p) or not 0 <= self.min_p <= 1):
            raise XllamaError(f"min-p {self.min_p} is out of range: it must be >= 0 and <= 1 "
                              "(0 means off)")
        if not is_real(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise XllamaError(f"repetition penalty {self.repetition_penalty} is out of range: it "
                              "must be a finite number > 0 (1 means off)")
        for name in ("frequency", "presence"):
            value = getattr(self, f"{name}_penalty")
            if not is_real(value) or not -2 <= value <= 2:
                raise XllamaError(f"{name} penalty {value} is out of range: it must be from -2 "
                                  "to 2 (0 means off)")

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0
                or self.presence_penalty != 0)


def apply_penalties(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None = None,
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits [..., V] with the penalties applied. seen: bool [..., V], the tokens of the prompt
    and the output (repetition penalty); counts: [..., V], how often each token is in the output
    (frequency and presence penalties)."""
    if s.repetition_penalty != 1 and seen is not None:
        p = s.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
    if (s.frequency_penalty or s.presence_penalty) and counts is not None:
        logits = (logits - s.frequency_penalty * counts
                  - s.presence_penalty * (counts > 0).to(logits.dtype))
    return logits


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None,
                  min_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, outside the smallest set of mass top-p, and
    below min-p times the most likely token's probability; in that order, as transformers."""
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
    if min_p is not None and min_p > 0:
        probs = logits.softmax(dim=-1)
        # the most likely token always stays (also at min_p 1, where ties to it stay too)
        drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. seen, counts: the penalties' history (apply_penalties)."""
    logits = apply_penalties(logits, s, seen, counts)
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / s.temperature, s.top_k, s.top_p, s.min_p).softmax(dim=-1)
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


class Sampler:
    """One sequence's choice of tokens: its settings, its own generator (so a seed gives the same
    tokens whatever else is decoded beside it), and the history its penalties need, kept on the
    device so that choosing a token never waits for the host."""

    def __init__(self, s: Sampling, prompt: list[int], vocab_size: int,
                 device: torch.device) -> None:
        self.sampling = s
        self.generator = make_generator(s, device)
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        if s.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt, device=device)] = True
        if s.frequency_penalty or s.presence_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    @property
    def greedy(self) -> bool:
        """The choice is the argmax of the raw logits."""
        return self.sampling.temperature <= 0 and not self.sampling.penalized

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] -> token id [1]."""
        return sample(logits, self.sampling, self.generator, self.seen, self.counts)

    def observe(self, token: torch.Tensor) -> None:
        """Count the chosen token [1] (a device tensor) into the penalties' history."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts.index_add_(0, token, torch.ones(1, device=self.counts.device))
