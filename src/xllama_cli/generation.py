"""Generation: prefill the prompts in one forward pass, then decode one token per step.

As in gpt-fast's generate.py, three small functions make every token: `prefill`, one decode
`Step` per token (the model's eager forward, or the step `compile_decode` makes), and `decode`,
the loop over steps; generate, chat and bench are their clients. Under tensor parallelism
they are given the TensorParallel (parallel.py), whose `broadcast` makes every rank take rank 0's
sampled tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .config import ModelConfig
from .errors import SettingError, XllamaError, is_whole
from .kv_cache import cache_capacity
from .model import Transformer
from .sampling import Sampling, make_generator, sample
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .parallel import TensorParallel

OnToken = Callable[[int, int], None]  # (row, token id)
# One decode step: (tokens [B, 1], cache slot, left padding [B] or None) -> logits [B, 1, vocab]
Step = Callable[[torch.Tensor, int, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0  # tokens made by decode steps (all rows), the prefill's first excluded
    # compiling the decode step (and recording its CUDA graph), apart from decode_s
    compile_s: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        compile = f" | compile {self.compile_s:.1f} s" if self.compile_s else ""
        return (f"prompt tokens {self.prompt_tokens} | new tokens {self.new_tokens} | "
                f"prefill {self.prefill_s * 1e3:.1f} ms{compile} | "
                f"decode {self.decode_tok_s:.1f} tok/s")


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each prompt (EOS excluded)
    stats: GenerationStats = field(default_factory=GenerationStats)


def context_length(model: Transformer | ModelConfig) -> int:
    """How many positions the model may use: its trained length, stretched by linear or dynamic
    RoPE."""
    cfg = model if isinstance(model, ModelConfig) else model.config
    if cfg.rope_type in ("linear", "dynamic"):
        return int(cfg.max_seq_len * float(cfg.rope_scaling["factor"]))
    return cfg.max_seq_len


def check_token_ids(ids: list[int], model: Transformer | ModelConfig) -> None:
    """Refuse ids the model has no embedding for: a tokenizer that does not belong to the model."""
    cfg = model if isinstance(model, ModelConfig) else model.config
    if ids and (max(ids) >= cfg.vocab_size or min(ids) < 0):
        bad = max(ids) if max(ids) >= cfg.vocab_size else min(ids)
        raise XllamaError(f"the text encodes to token id {bad}, but the model's vocabulary has "
                          f"{cfg.vocab_size} entries: the tokenizer does not belong to this model")


def check_prompts(model: Transformer | ModelConfig, prompts: list[list[int]],
                  max_new_tokens: int) -> None:
    """Refuse a request that cannot run, before anything of it is shown or computed."""
    if not is_whole(max_new_tokens) or max_new_tokens < 1:
        raise XllamaError(f"max new tokens {max_new_tokens} is out of range: it must be at least 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise XllamaError("every prompt needs at least one token")
    for p in prompts:
        check_token_ids(p, model)
    ctx = context_length(model)
    longest = max(len(p) for p in prompts)
    if longest > ctx:
        raise SettingError("the prompt has {longest} tokens but the model's context is {ctx}; "
                           "shorten it or extend the context with {rope} linear|dynamic "
                           "{rope_factor} F",
                           longest=longest, ctx=ctx)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_step(model: Transformer) -> Step:
    """The decode step as the model's own forward."""
    return lambda tokens, start, pad=None: model(tokens, start=start, pad=pad)


def compile_options(device: torch.device, mode: str | None = None,
                    tensor_parallel: bool = False) -> dict[str, bool]:
    """inductor's options for the decode step on `device`: those of torch.compile's `mode` if
    given; on CUDA by default CUDA graphs (as mode "reduce-overhead"), and coordinate-descent
    tuning of each kernel's launch settings, as gpt-fast sets it (with it inductor also turns a
    one-row product into a fused multiply-and-sum, the form that streams weights at the memory's
    speed). Under tensor parallelism no CUDA graph: the step's all-reduces would be captured in
    it, and an NCCL collective in a captured graph needs NCCL's capture support and a process
    group that never polls its work during the capture (torch's watchdog does), neither of
    which is checked here."""
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if device.type == "cuda":
        options.setdefault("triton.cudagraphs", True)
        options["coordinate_descent_tuning"] = True
    if tensor_parallel:
        options["triton.cudagraphs"] = False
    return options


def compile_decode(model: Transformer, mode: str | None = None, *,
                   tensor_parallel: bool = False) -> Step:
    """The one-token decode step compiled with torch.compile (`compile_options`: CUDA graphs on
    CUDA). Its shapes are static: the cache slot is a tensor and attention spans the whole cache,
    masked. Compiling happens at the step's first call; a compiler that cannot run (e.g. no C++
    compiler for inductor's CPU kernels) is a SettingError then."""
    options = compile_options(model.model.embed_tokens.weight.device, mode, tensor_parallel)
    # every model shares Transformer.forward's code: allow a compiled graph for each of many
    # models (bench's group counts) and shapes (batch, cache length) before falling back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled = torch.compile(model.forward, options=options, dynamic=False)

    def step(tokens: torch.Tensor, start: int, pad: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return compiled(tokens, start=torch.tensor(start, device=tokens.device), pad=pad)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None) or e
            reason = (str(inner).strip().splitlines() or [type(inner).__name__])[0][:300]
            raise SettingError("{compile} failed ({reason}); run without {compile}",
                               reason=reason) from None

    return step


@torch.inference_mode()
def prefill(model: Transformer, tokens: torch.Tensor, start: int, sampling: Sampling,
            generator: torch.Generator | None, pad: torch.Tensor | None = None,
            tp: TensorParallel | None = None) -> torch.Tensor:
    """Run tokens [B, T] through the model into cache slots start.. (the cache set up to hold them)
    and sample each row's next token [B] from the last position. Returns once the device is done,
    so that the call can be timed."""
    logits = model(tokens, start=start, pad=pad, last_only=True)
    nxt = next_token(logits, sampling, generator, tp)
    _sync(nxt.device)
    return nxt


@torch.inference_mode()
def generate_tokens(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                    sampling: Sampling = Sampling(), eos_ids: list[int] | None = None,
                    on_token: OnToken | None = None, *, step: Step | None = None,
                    tp: TensorParallel | None = None) -> Generation:
    """Generate for a batch of token-id prompts of any lengths (left-padded together).

    step: the decode step (`compile_decode`'s); None: the model's eager forward.
    tp: this rank's group under tensor parallelism, so that every rank samples rank 0's tokens."""
    check_prompts(model, prompts, max_new_tokens)
    device = model.lm_head.weight.device
    ctx = context_length(model)
    longest = max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, ctx - longest)
    B = len(prompts)
    pad_counts = [longest - len(p) for p in prompts]
    tokens = torch.tensor([[0] * n + p for n, p in zip(pad_counts, prompts)], device=device)
    pad = torch.tensor(pad_counts, device=device) if any(pad_counts) else None
    gen = make_generator(sampling, device)
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))
    if max_new_tokens == 0:
        return Generation([[] for _ in range(B)], stats)

    model.setup_cache(B, cache_capacity(longest + max_new_tokens, ctx))
    try:
        t0 = time.perf_counter()
        nxt = prefill(model, tokens, 0, sampling, gen, pad, tp)
        stats.prefill_s = time.perf_counter() - t0
        if step is not None and max_new_tokens > 1:
            stats.compile_s = warm_up_step(step, nxt, longest, pad)
        t1 = time.perf_counter()
        out, fed = decode(model, nxt, longest, max_new_tokens, sampling, gen, eos_ids, on_token,
                          pad, step=step, tp=tp)
        stats.decode_tokens = fed * B
        stats.decode_s = time.perf_counter() - t1
    finally:
        model.clear_cache()
    stats.new_tokens = sum(len(o) for o in out)
    return Generation(out, stats)


def warm_up_step(step: Step, first: torch.Tensor, start: int, pad: torch.Tensor | None) -> float:
    """Run the compiled decode step on the token decode feeds first, at the slot it goes to, so that
    compiling (and CUDA graph recording, which takes a few calls) is timed apart from decode.
    Decode then writes the same keys and values into that slot again: nothing changes."""
    t0 = time.perf_counter()
    for _ in range(3):
        step(first[:, None], start, pad)
    _sync(first.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
               tp: TensorParallel | None = None) -> torch.Tensor:
    """Sample from the last position's logits [B, T, V]; under tensor parallelism (`tp`) every
    rank takes rank 0's choice, so the ranks never drift apart."""
    nxt = sample(logits[:, -1], sampling, generator)
    if tp is not None:
        tp.broadcast(nxt)
    return nxt


def decode(model: Transformer, first: torch.Tensor, start: int, max_new_tokens: int,
           sampling: Sampling, generator: torch.Generator | None, eos_ids: list[int] | None,
           on_token: OnToken | None = None, pad: torch.Tensor | None = None, *,
           step: Step | None = None,
           tp: TensorParallel | None = None) -> tuple[list[list[int]], int]:
    """The decode loop over a filled cache: `first` [B] was sampled from the logits of slot start-1;
    each chosen token is fed back into slot start, start+1, ... until every row has made EOS or
    max_new_tokens tokens. Returns each row's new tokens (EOS excluded) and how many slots it
    filled, once the device is done (the last tokens are read back). step, tp: as in
    generate_tokens."""
    step = step or eager_step(model)
    B = first.shape[0]
    eos = torch.tensor(eos_ids or [], device=first.device)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=first.device)
    nxt, fed = first, 0
    for i in range(max_new_tokens):
        done |= torch.isin(nxt, eos)
        ids = nxt.tolist()  # also the point where the device is waited for
        for row, (tok, finished) in enumerate(zip(ids, done.tolist())):
            if not finished and len(out[row]) == i:
                out[row].append(tok)
                if on_token is not None:
                    on_token(row, tok)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(nxt[:, None], start + i, pad)
        fed += 1
        nxt = next_token(logits, sampling, generator, tp)
    return out, fed


def generate(model: Transformer, tokenizer: Tokenizer, prompts: str | list[str], *,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None) -> list[str]:
    """Generate continuations for text prompts; returns the new text of each (prompt excluded)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    result = generate_tokens(model, ids, max_new_tokens, Sampling(temperature, top_k, top_p, seed),
                             eos_ids=tokenizer.eos_ids)
    return [continuation_text(tokenizer, t) for t in result.tokens]


def continuation_text(tokenizer: Tokenizer, tokens: list[int]) -> str:
    """Text of tokens that follow a prompt, its leading space kept."""
    stream = tokenizer.stream()
    return "".join(stream.push(t) for t in tokens) + stream.flush()
