"""Generation: token-id prompts in, new tokens out, on the engine (engine.py), whose decode loop
generate, chat, bench and the server share; and the compiled decode step (`compile_decode`), a
plug-in the engine is given. Under tensor parallelism the engine is given the TensorParallel
(parallel.py), whose `broadcast` makes every rank take rank 0's sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .config import ModelConfig
from .engine import (Engine, Event, Request, Step, check_token_ids,  # noqa: F401 - re-exported
                     context_length)
from .errors import SettingError, XllamaError, is_whole
from .model import Transformer
from .sampling import Sampling

if TYPE_CHECKING:
    from .parallel import TensorParallel
    from .tokenizer import Tokenizer

OnToken = Callable[[int, int], None]  # (row, token id)
OnText = Callable[[int, str], None]  # (row, text)


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
    texts: list[str] = field(default_factory=list)  # their text, when a tokenizer was given


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
    CUDA). Its shapes are static: each row's cache slot is a tensor, and the engine gives it few
    row counts and attention spans (powers of two), one compiled graph each. Compiling happens at
    the step's first call; a compiler that cannot run (e.g. no C++ compiler for inductor's CPU
    kernels) is a SettingError then."""
    options = compile_options(model.model.embed_tokens.weight.device, mode, tensor_parallel)
    # every model shares Transformer.forward's code: allow a compiled graph for each of many
    # models (bench's group counts) and shapes (rows, span) before falling back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled = torch.compile(model.forward, options=options, dynamic=False)

    def step(tokens: torch.Tensor, starts: torch.Tensor, span: int) -> torch.Tensor:
        try:
            return compiled(tokens, start=starts, span=span)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None) or e
            reason = (str(inner).strip().splitlines() or [type(inner).__name__])[0][:300]
            raise SettingError("{compile} failed ({reason}); run without {compile}",
                               reason=reason) from None

    return step


@torch.inference_mode()
def generate_tokens(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                    sampling: Sampling = Sampling(), eos_ids: list[int] | None = None,
                    on_token: OnToken | None = None, *, step: Step | None = None,
                    tp: TensorParallel | None = None, tokenizer: Tokenizer | None = None,
                    stop: Sequence[str] = (), on_text: OnText | None = None) -> Generation:
    """Generate for token-id prompts of any lengths, together on one engine; each gets the tokens
    it would get alone (its own generator, seeded by `sampling.seed`).

    eos_ids: ids that end a prompt's generation (None: none). step: the decode step
    (`compile_decode`'s); None: the model's eager forward. tp: this rank's group under tensor
    parallelism, so that every rank samples rank 0's tokens. tokenizer: for the texts (and
    `on_text`, their pieces as they come) and for `stop` strings, which end a prompt's
    generation and are left out of its text."""
    check_prompts(model, prompts, max_new_tokens)
    engine = Engine(model, tokenizer, max_batch=len(prompts), step=step, tp=tp)
    tokens: list[list[int]] = [[] for _ in prompts]
    texts = ["" for _ in prompts]

    def receiver(row: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            tokens[row] += event.tokens
            texts[row] += event.text
            for tok in event.tokens if on_token is not None else ():
                on_token(row, tok)
            if on_text is not None and event.text:
                on_text(row, event.text)
        return on_event

    for row, prompt in enumerate(prompts):
        if len(prompt) < engine.context:  # a prompt filling the context has no room for more
            engine.add(Request(prompt, max_new_tokens, sampling, stop, list(eos_ids or []),
                               on_event=receiver(row)))
    try:
        engine.run()
    finally:
        model.clear_cache()
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts),
                            new_tokens=sum(len(t) for t in tokens), prefill_s=engine.prefill_s,
                            decode_s=engine.decode_s, decode_tokens=engine.decode_tokens,
                            compile_s=engine.compile_s)
    return Generation(tokens, stats, texts if tokenizer is not None else [])


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
