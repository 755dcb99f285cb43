"""Continued pre-training (the GQA paper's "uptraining") and training from scratch: one loop.

Next-token loss on random windows of a token stream, AdamW, linear warm-up then cosine decay,
gradient clipping. The whole state (weights, optimizer, data sampler, step) is saved every
`save_every` steps and when SIGINT or SIGTERM stops the run, so a stopped or killed run resumed
from it ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F

from .errors import XllamaError, is_real, is_whole
from .model import Transformer
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


@dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 0  # steps; 0: 5% of steps
    batch: int = 8
    context: int = 256
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    save_every: int = 0  # 0: no resumable state

    def __post_init__(self) -> None:
        for flag, value, low in (("--steps", self.steps, 1), ("--batch", self.batch, 1),
                                 ("--context", self.context, 2),
                                 ("--save-every", self.save_every, 0),
                                 ("warmup", self.warmup, 0), ("--seed", self.seed, 0)):
            if not is_whole(value) or value < low:
                raise XllamaError(f"{flag} {value} is out of range: it must be a whole number "
                                  f">= {low}")

        def finite(x: object) -> bool:  # NaN: False
            return is_real(x) and math.isfinite(x)

        decay, ratio = self.weight_decay, self.min_lr_ratio
        for flag, value, ok, rule in (
                ("--lr", self.lr, finite(self.lr) and self.lr > 0, "> 0"),
                ("clip", self.clip, finite(self.clip) and self.clip > 0, "> 0"),
                ("weight decay", decay, finite(decay) and decay >= 0, ">= 0"),
                ("min lr ratio", ratio, finite(ratio) and 0 <= ratio <= 1, "from 0 to 1")):
            if not ok:
                raise XllamaError(f"{flag} {value} is out of range: it must be a finite number "
                                  f"{rule}")

    @property
    def warmup_steps(self) -> int:
        return self.warmup or max(1, self.steps // 20)


def encode_text(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """A text as one token stream: each paragraph (blank-line separated) starts with BOS."""
    ids: list[int] = []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        if para:
            ids += tokenizer.encode(para)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for step (0-based): linear warm-up, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_batch(data: torch.Tensor, batch: int, context: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - context - 1, (batch,), generator=generator)
    window = torch.stack([data[s: s + context + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    # no weight decay on norms (1-d weights), as is usual for Llama training
    decay = [p for p in model.parameters() if p.dim() >= 2]
    keep = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class StepInfo:
    step: int
    loss: float
    lr: float
    tokens_per_s: float


class Stopped(Exception):
    """Training stopped early by SIGINT or SIGTERM, after a whole step; `saved` says whether the
    state of that step is in the state file (it is when the run saves a resumable state)."""

    def __init__(self, signum: int, step: int, steps: int, saved: bool) -> None:
        self.signum, self.step, self.steps, self.saved = signum, step, steps, saved
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of {steps}")


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """While training, SIGINT (Ctrl-C) and SIGTERM are noted in the yielded list rather than acted
    on, so the loop ends after the step in progress, whose state is whole and can be saved; the
    first one puts the usual handlers back, so a second acts at once. Signals reach only the main
    thread: elsewhere nothing changes."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def note(signum: int, _frame: object) -> None:
        noted.append(signum)
        restore()

    for s in previous:
        signal.signal(s, note)
    try:
        yield noted
    finally:
        restore()


def train(model: Transformer, data: torch.Tensor, cfg: TrainConfig, *,
          state_path: Path | None = None, resume: bool = False,
          on_step: Callable[[StepInfo], None] | None = None) -> list[float]:
    """Train `model` in place for cfg.steps steps; returns the loss of each step run here.

    state_path: where the resumable state goes (every cfg.save_every steps); resume: start from it.
    SIGINT or SIGTERM ends the run after the step in progress, saves its state (when the run saves
    one) and raises Stopped; resuming from that state ends with the weights of a run that never
    stopped.
    """
    if len(data) <= cfg.context + 1:
        raise XllamaError(f"the text has {len(data)} tokens; training needs more than --context "
                          f"{cfg.context}")
    device = model.lm_head.weight.device
    model.train().requires_grad_(True)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = _restore(state_path, model, opt, gen, cfg) if resume else 0
    saving = state_path is not None and cfg.save_every > 0
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    losses: list[float] = []
    saved = step
    with _stop_requests() as stop:
        while step < cfg.steps and not stop:
            t0 = time.perf_counter()
            x, y = sample_batch(data, cfg.batch, cfg.context, gen)
            x, y = x.to(device), y.to(device)
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            step += 1
            losses.append(loss.item())
            if on_step is not None:
                on_step(StepInfo(step, losses[-1], lr, x.numel() / (time.perf_counter() - t0)))
            if saving and (step % cfg.save_every == 0 or step == cfg.steps or stop):
                save_state(state_path, model, opt, gen, step, cfg)
                saved = step
    model.eval().requires_grad_(False)
    if stop:
        raise Stopped(stop[0], step, cfg.steps, saving and saved == step)
    return losses


def _restore(state_path: Path | None, model: Transformer, opt: torch.optim.Optimizer,
             gen: torch.Generator, cfg: TrainConfig) -> int:
    """Model, optimizer and data order as a saved state left them; returns the step to run next."""
    if state_path is None or not state_path.is_file():
        raise XllamaError(f"--resume: no saved state at {state_path}")
    state = torch.load(state_path, map_location=model.lm_head.weight.device, weights_only=True)
    if state["config"] != asdict(cfg):
        raise XllamaError(f"--resume: {state_path} was saved with other settings: "
                          f"{state['config']}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return state["step"]


def save_state(path: Path, model: Transformer, opt: torch.optim.Optimizer, gen: torch.Generator,
               step: int, cfg: TrainConfig) -> None:
    from .writer import atomic_write

    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "generator": gen.get_state(), "step": step, "config": asdict(cfg)}
    # a kill mid-save keeps the previous state
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def init_weights(model: Transformer, seed: int) -> None:
    """Fresh weights for training from scratch: N(0, 0.02), residual outputs scaled by
    1/sqrt(2L)."""
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.n_layers
    residual = ("o_proj.weight", "down_proj.weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                p.fill_(1.0) if name.endswith("norm.weight") else p.zero_()
                continue
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(residual) else 0.02
            p.copy_(torch.randn(p.shape, generator=g) * std)


@dataclass
class UptrainResult:
    out: Path
    steps: int
    first_loss: float
    last_loss: float
    minutes: float
    perplexity_before: float | None = None
    perplexity_after: float | None = None


def uptrain(source: Checkpoint, text_path: Path, out: Path, cfg: TrainConfig, *,
            eval_path: Path | None = None, resume: bool = False, force: bool = False,
            device: str = "auto", dtype: str | None = None,
            state_path: Path | None = None) -> UptrainResult:
    """Continued pre-training of an opened checkpoint on a text file, saved as an HF folder at
    `out`.

    Weights train in float32 (bf16 autocast on CUDA) and are stored in the source's dtype unless
    `dtype` says otherwise. The resumable state lives at `state_path` (default: next to `out`)
    and is removed once `out` is written. Stopped (SIGINT, SIGTERM) leaves the state and no `out`.
    """
    from . import report
    from .convert import resolve_out_dtype, save_model
    from .evaluate import evaluate_text, read_text
    from .loading import load_model
    from .tokenizer import load_tokenizer
    from .writer import check_destination

    out = check_destination(out, force=force, sources=source.sources)
    out_dtype = resolve_out_dtype(dtype)
    tokenizer = load_tokenizer(source)
    data = encode_text(tokenizer, read_text(text_path))
    if eval_path is not None:
        read_text(eval_path)  # fail before training, not after
    model = load_model(source, device=device, dtype="float32", pack=False)  # trained: plain weights
    src_dtype = next(t.dtype for _, t in source.tensors())
    if cfg.context > model.config.max_seq_len:
        raise XllamaError(f"--context {cfg.context} is longer than the model's "
                          f"{model.config.max_seq_len} positions")
    state_path = state_path or out.with_name(f".{out.name}.uptrain-state.pt")
    result = UptrainResult(out, cfg.steps, 0.0, 0.0, 0.0)
    if eval_path is not None:
        result.perplexity_before = evaluate_text(model, tokenizer, eval_path,
                                                 label="perplexity before").perplexity
    t0 = time.time()
    with report.progress(cfg.steps, "uptraining", unit="steps") as advance:
        def on_step(info: StepInfo) -> None:
            advance(1, note=f"loss {info.loss:.3f} lr {info.lr:.1e} {info.tokens_per_s:,.0f} tok/s")
        losses = train(model, data, cfg, state_path=state_path, resume=resume, on_step=on_step)
    result.minutes = (time.time() - t0) / 60
    result.first_loss, result.last_loss = (losses[0], losses[-1]) if losses else (float("nan"),) * 2
    if eval_path is not None:
        result.perplexity_after = evaluate_text(model, tokenizer, eval_path,
                                                label="perplexity after").perplexity
    record = {"method": "uptrain", "text": str(Path(text_path).resolve()),
              "train_config": asdict(cfg), "perplexity_before": result.perplexity_before,
              "perplexity_after": result.perplexity_after}
    save_model(model, source, out, record, force=force, dtype=out_dtype or src_dtype)
    state_path.unlink(missing_ok=True)
    return result
