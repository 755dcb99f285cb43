"""Perplexity of a model on a text, scored with sliding windows that each start with BOS."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import report
from .config import ModelConfig
from .errors import XllamaError, read_utf8
from .generation import check_token_ids, context_length
from .model import Transformer
from .tokenizer import Tokenizer


@dataclass
class Window:
    begin: int  # first text token in the window (after its BOS)
    end: int  # one past the last text token
    scored: int  # first text token this window scores; tokens in [scored, end) are scored here


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood of a scored token, in nats
    tokens_scored: int
    windows: int
    context: int
    stride: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows that score a text of `n_tokens` tokens t[0..N) exactly once each.

    With context C (tokens the model sees, BOS included) and stride S (1 <= S <= C - 1):
    window k holds the text tokens t[k*S, min(k*S + C - 1, N)) and is fed to the model, from
    position 0, as [BOS] + those tokens, as llama.cpp's perplexity starts each chunk with BOS. It
    scores the tokens of its span that no earlier window scored, t[max(k*S, end of window k-1),
    end of window k), each predicted from BOS and the window's tokens before it; t[0] is scored
    from BOS alone. The last window is the first that reaches N. With S = C - 1 the windows do
    not overlap (llama.cpp's chunks); a smaller S gives each token after the first window at
    least C - 1 - S tokens of context besides BOS, at the cost of about (C - 1) / S times the work.
    """
    out: list[Window] = []
    begin, scored = 0, 0
    while scored < n_tokens:
        end = min(begin + context - 1, n_tokens)
        out.append(Window(begin, end, max(begin, scored)))
        scored = end
        begin += stride
    return out


def window_settings(limit: int, context: int | None = None,
                    stride: int | None = None) -> tuple[int, int]:
    """(context, stride) for a model of `limit` positions: defaults filled in, ranges checked."""
    context = limit if context is None else context
    if context < 2:
        raise XllamaError(f"--context {context} is too small: a window needs BOS and at least one "
                          "token")
    if context > limit:
        raise XllamaError(f"--context {context} is longer than the model's context, {limit} "
                          f"tokens; choose at most {limit}")
    stride = context // 2 if stride is None else stride
    if not 1 <= stride <= context - 1:
        raise XllamaError(f"--stride {stride} must be between 1 and --context - 1 = {context - 1}, "
                          "or tokens would go unscored")
    return context, stride


@torch.inference_mode()
def perplexity(model: Transformer, tokens: list[int], bos_id: int, context: int | None = None,
               stride: int | None = None,
               on_progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of `model` on text tokens (no BOS in `tokens`), windows as in `windows()`.

    context: default the model's context; stride: default context // 2.
    """
    check_text(tokens, bos_id, model)
    context, stride = window_settings(context_length(model), context, stride)
    device = model.lm_head.weight.device
    text = torch.tensor(tokens, dtype=torch.long, device=device)
    bos = torch.tensor([bos_id], dtype=torch.long, device=device)
    total_nll, n_scored = 0.0, 0
    plan = windows(len(tokens), context, stride)
    t0 = time.perf_counter()
    for w in plan:
        ids = torch.cat([bos, text[w.begin:w.end]])[None]
        logits = model(ids)[0]  # float32, [1 + end - begin, vocab]
        # logits at window position j predict window token j + 1, i.e. text token begin + j
        lo, hi = w.scored - w.begin, w.end - w.begin
        nll = F.cross_entropy(logits[lo:hi], text[w.scored:w.end], reduction="sum")
        total_nll += float(nll.double())  # .item() also waits for the device
        n_scored += w.end - w.scored
        if on_progress is not None:
            on_progress(w.end - w.scored)
    seconds = time.perf_counter() - t0
    mean = total_nll / n_scored
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens_scored=n_scored,
                            windows=len(plan), context=context, stride=stride, seconds=seconds)


def read_text(path: str | Path) -> str:
    text = read_utf8(path, "--text")
    if not text.strip():
        raise XllamaError(f"--text {path} is empty")
    return text


def check_text(tokens: list[int], bos_id: int | None, model: Transformer | ModelConfig) -> None:
    """Refuse text tokens `perplexity` cannot score: none, no BOS to start a window with, or ids
    the model has no embedding for (a tokenizer that is not the model's)."""
    if not tokens:
        raise XllamaError("the text has no tokens to score")
    if bos_id is None or bos_id < 0:
        raise XllamaError("the tokenizer has no BOS token, which every window starts with")
    check_token_ids(tokens, model)


def text_tokens(tokenizer: Tokenizer, text_path: str | Path) -> list[int]:
    """A text file's tokens, as perplexity scores them (no BOS)."""
    return tokenizer.encode(read_text(text_path), bos=False)


def evaluate_tokens(model: Transformer, tokens: list[int], bos_id: int, context: int | None = None,
                    stride: int | None = None, progress: bool = True,
                    label: str = "perplexity") -> PerplexityResult:
    """Perplexity of `model` on text tokens, with a progress bar on stderr."""
    with report.progress(len(tokens), label, unit="tokens", enabled=progress) as advance:
        return perplexity(model, tokens, bos_id, context, stride, on_progress=advance)


def evaluate_text(model: Transformer, tokenizer: Tokenizer, text_path: str | Path,
                  context: int | None = None, stride: int | None = None, progress: bool = True,
                  label: str = "perplexity") -> PerplexityResult:
    """Perplexity of `model` on a text file, with a progress bar on stderr."""
    return evaluate_tokens(model, text_tokens(tokenizer, text_path), tokenizer.bos_id, context,
                           stride, progress, label)
