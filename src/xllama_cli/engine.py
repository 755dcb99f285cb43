"""The engine: one model, a fixed number of sequence slots (rows of one KV cache), and the one
decode loop; generate, chat, bench and the server are its clients.

As in gpt-fast's generate.py, a request is prefilled, then every live row takes one decode step
at a time (a `Step`: the model's eager forward, or the step generation.compile_decode makes).
Unlike there, rows are independent: each sits at its own position in its own cache row, so a
request joins while others decode (continuous batching) and leaves its slot the moment it ends,
and its tokens are those it would get alone.

Each decode step reads the device once (`to_host`: the chosen ids, with the log-probabilities
when asked). What the next step needs (each row's token and cache slot) stays on the device; the
end of a request (EOS, a stop string, its length) is decided on the host from the ids read.

The engine is not thread-safe: one thread drives it (a server passes add and cancel to it).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .config import ModelConfig
from .errors import XllamaError, is_whole
from .kv_cache import cache_capacity
from .model import Transformer
from .sampling import Sampler, Sampling

if TYPE_CHECKING:
    from .parallel import TensorParallel
    from .tokenizer import StreamDecoder, Tokenizer

# One decode step: (tokens [B, 1], each row's cache slot [B], cache slots attention spans) ->
# logits [B, 1, vocab]; see Transformer.forward. An eager step may be given one slot (an int) for
# every row; the compiled one always gets the tensor, which keeps its shapes static.
Step = Callable[[torch.Tensor, "torch.Tensor | int", int], torch.Tensor]
# a compiled step's first calls at a new shape compile it (and on CUDA record its graph)
WARM_UP_CALLS = 3


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


def eager_step(model: Transformer) -> Step:
    """The decode step as the model's own forward."""
    return lambda tokens, starts, span: model(tokens, start=starts, span=span)


def to_host(t: torch.Tensor) -> list:
    """Read a tensor back to the host: the point where the host waits for the device. The decode
    loop calls it once a step (and a prefill once, for the request's first token)."""
    return t.tolist()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- the API ----
@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's raw logits (before temperature and
    penalties), and the `top` most likely tokens with theirs, best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What a request made since its last event, delivered to Request.on_event."""

    request: Handle  # what Engine.add returned
    text: str = ""  # new text; stop strings never appear, and text that may start one is held
    tokens: list[int] = field(default_factory=list)  # the ids this event covers (EOS never)
    logprobs: Optional[list[TokenLogprob]] = None  # one per token, when the request asked
    finish_reason: Optional[str] = None  # None while running; "stop", "length" or "cancelled"
    # on the last event: usage and timings
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0  # from add() to the first token
    decode_s: float = 0.0  # the decode steps this request took part in


@dataclass
class Request:
    prompt: list[int]  # token ids, already templated and encoded
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)  # its own generator (seed), penalties
    stop: Sequence[str] = ()  # stop strings, matched on the decoded text
    eos_ids: Optional[Sequence[int]] = None  # None: the tokenizer's
    logprobs: Optional[int] = None  # None: none; k: the chosen token's and the top k
    on_event: Optional[Callable[[Event], None]] = None  # called on the engine's thread


class StopStrings:
    """Finds stop strings in text that arrives in pieces (a string may span tokens). Text that
    could be the start of a stop string is held back until the next piece decides it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text that may be shown now, whether a stop string was found). On a stop, the text is
        what came before the earliest stop string; everything from it on is dropped."""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            shown, self.pending = self.pending[:min(found)], ""
            return shown, True
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.pending) + 1))
                    if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        shown, self.pending = self.pending[:cut], self.pending[cut:]
        return shown, False

    def flush(self) -> str:
        """The held text, at the end of a request that stopped otherwise."""
        shown, self.pending = self.pending, ""
        return shown


class Handle:
    """A request inside the engine: what add() returns, and each of its events' `request`."""

    def __init__(self, request: Request, number: int, max_new: int, eos: set[int],
                 stream: StreamDecoder | None) -> None:
        self.request, self.number = request, number
        self.max_new = max_new  # max_new_tokens, within the context
        self.eos = eos
        self.stream = stream
        self.stop = StopStrings(request.stop) if request.stop else None
        self.sampler: Sampler | None = None  # made when the request gets a slot
        self.tokens: list[int] = []  # the new tokens so far, EOS excluded
        self.row: int | None = None
        self.finish_reason: str | None = None
        self.hit_stop = False
        self.cancelled = False
        self.added = time.perf_counter()
        self.ttft_s = 0.0
        self.prefill_tokens = 0  # the prompt tokens its prefill ran (past a kept prefix)
        self.prefill_s = 0.0
        self.decode_tokens = 0  # tokens fed by decode steps
        self.decode_s = 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def text_of(self, token: int) -> str:
        """The text `token` adds that may be shown now; a stop string found sets `hit_stop`."""
        return self._past_stops(self.stream.push(token) if self.stream else "")

    def tail(self) -> str:
        """At the end (EOS, length): the text the decoder and the stop strings held back."""
        if self.hit_stop:
            return ""
        shown = self._past_stops(self.stream.flush() if self.stream else "")
        if self.stop is not None and not self.hit_stop:
            shown += self.stop.flush()
        return shown

    def _past_stops(self, text: str) -> str:
        if self.stop is None:
            return text
        shown, hit = self.stop.push(text)
        self.hit_stop = self.hit_stop or hit
        return shown


class Engine:
    """Runs requests on `model`, `max_batch` of them at a time, in one KV cache."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None,
                 max_batch: int = 8, *, step: Step | None = None,
                 tp: TensorParallel | None = None, context: int | None = None) -> None:
        """tokenizer: for text, stop strings and the default EOS ids (None: tokens only).
        step: the compiled decode step (generation.compile_decode); None: the eager forward.
        tp: this rank's group under tensor parallelism: every rank takes rank 0's tokens.
        context: the most tokens a request may hold, prompt and answer (default: the model's)."""
        limit = context_length(model)
        if not is_whole(max_batch) or max_batch < 1:
            raise XllamaError(f"max batch {max_batch} is out of range: it must be at least 1")
        if context is not None and (not is_whole(context) or not 2 <= context <= limit):
            raise XllamaError(f"context {context} is out of range: it must be between 2 and the "
                              f"model's context, {limit}")
        self.model, self.tokenizer, self.tp = model, tokenizer, tp
        self.context = context or limit
        self.device = model.lm_head.weight.device
        self._max_batch = max_batch
        self._step = step or eager_step(model)
        self._compiled = step is not None
        self.slots: list[Handle | None] = [None] * max_batch
        # the tokens whose keys and values each cache row holds, slot by slot; a finished
        # request's stay for the next request that shares a prefix with them
        self.held: list[list[int]] = [[] for _ in range(max_batch)]
        self.queue: deque[Handle] = deque()
        self._cache = None  # the model's cache when the engine last set it up
        self._next = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # rows' tokens
        self._starts: torch.Tensor | None = None  # each decoded row's slot; None: rows changed
        self._advance: torch.Tensor | None = None  # 1 for a live row, 0 for an idle one
        self._warm: set[tuple[int, int]] = set()  # (rows, span) the compiled step has run at
        self._numbers = itertools.count()
        # totals over the engine's life (generate's summary)
        self.prefill_s = self.decode_s = self.compile_s = 0.0
        self.decode_tokens = 0

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def live(self) -> int:
        return sum(h is not None for h in self.slots)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    # ---- requests ----
    def check(self, request: Request) -> None:
        """Refuse a request that can never run, with one line saying why."""
        r, vocab = request, self.model.config.vocab_size
        if not isinstance(r.prompt, (list, tuple)) or not r.prompt:
            raise XllamaError("the prompt is empty: it needs at least one token")
        if not all(is_whole(t) for t in r.prompt):
            raise XllamaError("the prompt must be a list of token ids (whole numbers)")
        check_token_ids(list(r.prompt), self.model)
        if len(r.prompt) >= self.context:
            raise XllamaError(f"the prompt has {len(r.prompt)} tokens but the context holds "
                              f"{self.context}; shorten it to leave room for an answer")
        if not is_whole(r.max_new_tokens) or r.max_new_tokens < 1:
            raise XllamaError(f"max new tokens {r.max_new_tokens} is out of range: it must be at "
                              "least 1")
        if not isinstance(r.sampling, Sampling):
            raise XllamaError("sampling must be a Sampling")
        if isinstance(r.stop, str) or not all(isinstance(s, str) and s for s in r.stop):
            raise XllamaError("stop strings must be a list of non-empty strings")
        if r.stop and self.tokenizer is None:
            raise XllamaError("stop strings need the engine's tokenizer, to decode the text")
        if r.eos_ids is not None and not all(is_whole(t) for t in r.eos_ids):
            raise XllamaError("EOS ids must be whole numbers")
        if r.logprobs is not None and (not is_whole(r.logprobs) or not 0 <= r.logprobs <= vocab):
            raise XllamaError(f"logprobs {r.logprobs} is out of range: it must be from 0 to the "
                              f"vocabulary's {vocab}")

    def add(self, request: Request) -> Handle:
        """Check a request and queue it; it starts at a step with a free slot."""
        self.check(request)
        eos = request.eos_ids
        if eos is None:
            eos = self.tokenizer.eos_ids if self.tokenizer is not None else []
        handle = Handle(request, next(self._numbers),
                        min(request.max_new_tokens, self.context - len(request.prompt)),
                        set(eos), self.tokenizer.stream() if self.tokenizer is not None else None)
        self.queue.append(handle)
        return handle

    def cancel(self, handle: Handle) -> None:
        """End a request at the next step (finish_reason "cancelled"), freeing its slot."""
        if not handle.done:
            handle.cancelled = True

    def run(self) -> None:
        """Step until every request has ended."""
        while self.step():
            pass

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: end cancelled requests, prefill waiting ones into free slots, then one
        decode step for every live row. Returns whether work remains."""
        self._drop_cancelled()
        self._admit()
        if self.live:
            self._decode()
        return bool(self.queue) or self.live > 0

    def kept(self, row: int) -> list[int]:
        """The tokens cache row `row` holds (none when the model's cache is no longer this
        engine's)."""
        return self.held[row] if self.model.cache is self._cache is not None else []

    def clear(self) -> None:
        """Free the KV cache and forget what it held (an idle engine)."""
        self.model.clear_cache()
        self._cache, self.held = None, [[] for _ in range(self._max_batch)]

    # ---- inside a step ----
    def _drop_cancelled(self) -> None:
        events = [self._finish(h, "cancelled") for h in self.queue if h.cancelled]
        if events:
            self.queue = deque(h for h in self.queue if not h.cancelled)
        for row, h in enumerate(self.slots):
            if h is not None and h.cancelled:
                events.append(self._finish(h, "cancelled"))
                self._free(row)
        self._deliver(events)

    def _choose_slot(self, prompt: list[int]) -> int:
        """The free slot whose held tokens share the longest prefix with `prompt` (the lowest
        among equals, so that decode steps span few rows)."""
        free = [row for row, h in enumerate(self.slots) if h is None]
        return max(free, key=lambda row: (common_prefix(self.held[row], prompt), -row))

    def _forget_if_replaced(self) -> None:
        if self.model.cache is not self._cache:  # cleared or replaced by another user
            self._cache, self.held = None, [[] for _ in range(self._max_batch)]

    def _reserve(self, tokens: int) -> None:
        """Room for `tokens` slots in every row: the cache grows (its contents kept) to the next
        power of two as requests need it, never past the context."""
        self._forget_if_replaced()
        self.model.setup_cache(self._max_batch, cache_capacity(tokens, self.context))
        self._forget_if_replaced()  # a cache of another batch size was replaced
        self._cache = self.model.cache

    def _admit(self) -> None:
        """Give waiting requests the free slots, then prefill them: each from the longest prefix
        its row holds (its last prompt token always runs, for the first logits). Requests that
        start at one slot with as many new tokens, on neighbouring rows, run as one batch (a
        batch of equal prompts prefills as fast as it did before the engine)."""
        placed: list[tuple[Handle, int, int]] = []  # (request, row, kept prefix)
        while self.queue and None in self.slots:
            h = self.queue.popleft()
            if h.cancelled:
                self._deliver([self._finish(h, "cancelled")])
                continue
            prompt = h.request.prompt
            self._reserve(len(prompt) + h.max_new)
            row = self._choose_slot(prompt)
            keep = min(common_prefix(self.held[row], prompt), len(prompt) - 1)
            self.held[row] = self.held[row][:keep]
            self.slots[row] = h  # taken; a cancel before its prefill frees it again
            placed.append((h, row, keep))
        groups: list[list[tuple[Handle, int, int]]] = []
        for h, row, keep in placed:
            last = groups[-1][-1] if groups else None
            if last and row == last[1] + 1 and keep == last[2] \
                    and len(h.request.prompt) == len(last[0].request.prompt):
                groups[-1].append((h, row, keep))
            else:
                groups.append([(h, row, keep)])
        events: list[Event] = []
        try:
            for group in groups:
                events += self._prefill(group)
        except BaseException:  # stopped midway (Ctrl-C): the requests not prefilled wait again
            for h, row, _ in reversed(placed):
                if h.row is None:
                    self.slots[row] = None
                    self.queue.appendleft(h)
            raise
        self._deliver(events)

    def _prefill(self, group: list[tuple[Handle, int, int]]) -> list[Event]:
        """Prefill requests on neighbouring rows from one kept length, and take their first
        tokens; returns their events."""
        handles, first, keep = [h for h, _, _ in group], group[0][1], group[0][2]
        t0 = time.perf_counter()
        for h in handles:
            h.sampler = Sampler(h.request.sampling, h.request.prompt,
                                self.model.config.vocab_size, self.device)
        tokens = torch.tensor([h.request.prompt[keep:] for h in handles], device=self.device)
        logits = self.model(tokens, start=keep, last_only=True, row=first)[:, -1]
        ids, read = self._choose(logits, handles)
        self._next[first:first + len(handles)] = ids
        values = self._unpack(to_host(read), handles)
        dt = time.perf_counter() - t0
        self.prefill_s += dt
        self._starts = None
        events = []
        for (h, row, _), value in zip(group, values):
            h.prefill_s, h.ttft_s = dt, time.perf_counter() - h.added
            h.prefill_tokens = len(h.request.prompt) - keep
            self.held[row], h.row = list(h.request.prompt), row
            events.append(self._accept(h, *value))
            if h.done:
                self._free(row)
        return events

    def _decode(self) -> None:
        """One step for rows 0..n-1, n past the last live row; an idle row among them writes
        its slot just past what it holds, where nothing kept is overwritten."""
        t0 = time.perf_counter()
        live = [row for row, h in enumerate(self.slots) if h is not None]
        n = live[-1] + 1
        if self._compiled:  # few shapes: one compiled graph each
            n = min(self._max_batch, 1 << (n - 1).bit_length())
        lengths = [len(self.held[row]) for row in range(n)]
        if not self._compiled and min(lengths) == max(lengths):
            # every row at one slot: the model's plain path (no mask, a sliced write)
            start, span = lengths[0], lengths[0] + 1
        else:
            if self._starts is None or self._starts.shape[0] != n:
                self._starts = torch.tensor(lengths, device=self.device)
                self._advance = torch.tensor([self.slots[r] is not None for r in range(n)],
                                             dtype=torch.long, device=self.device)
            start, span = self._starts, max(lengths) + 1
            if self._compiled:
                span = cache_capacity(span, self.model.cache_len)
        tokens = self._next[:n, None]
        if self._compiled and (n, span) not in self._warm:
            t0 += self._warm_up(tokens, start, span)  # counted as compiling, not decoding
        logits = self._step(tokens, start, span)[:, -1]
        handles = self.slots[:n]
        ids, read = self._choose(logits, handles)
        self._next[:n] = ids
        # the rows' slots move on on the device (None: rebuilt from the host when next needed)
        self._starts = start + self._advance if isinstance(start, torch.Tensor) else None
        values = self._unpack(to_host(read), handles)
        dt = time.perf_counter() - t0
        self.decode_tokens += len(live)
        events = []
        for row in live:
            h = self.slots[row]
            self.held[row].append(h.tokens[-1])  # the token this step fed
            h.decode_tokens += 1
            h.decode_s += dt
            events.append(self._accept(h, *values[row]))
            if h.done:
                self._free(row)
        self._deliver(events)
        self.decode_s += time.perf_counter() - t0  # the whole step, its events delivered

    def _warm_up(self, tokens: torch.Tensor, start: torch.Tensor, span: int) -> float:
        """Run the compiled step at a new shape before the timed step: compiling (and recording
        a CUDA graph) is counted apart; returns its seconds. The real step writes the same keys
        and values again."""
        t0 = time.perf_counter()
        for _ in range(WARM_UP_CALLS):
            self._step(tokens, start, span)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        self.compile_s += took
        self._warm.add((tokens.shape[0], span))
        return took

    def _choose(self, logits: torch.Tensor,
                handles: Sequence[Handle | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next token from logits [n, V] (an idle row's None: argmax), and the one
        tensor to read back: the ids, then each asking row's log-probabilities."""
        ids = logits.argmax(dim=-1)
        for i, h in enumerate(handles):
            if h is not None and not h.sampler.greedy:
                ids[i:i + 1] = h.sampler.choose(logits[i:i + 1])
        if self.tp is not None:
            self.tp.broadcast(ids)
        parts = []
        for i, h in enumerate(handles):
            if h is None:
                continue
            h.sampler.observe(ids[i:i + 1])
            if h.request.logprobs is not None:
                lp = logits[i].float().log_softmax(dim=-1)
                top = lp.topk(h.request.logprobs)
                parts += [lp[ids[i:i + 1]].double(), top.values.double(), top.indices.double()]
        return ids, (torch.cat([ids.double(), *parts]) if parts else ids)

    @staticmethod
    def _unpack(values: list, handles: Sequence[Handle | None]
                ) -> list[tuple[int, TokenLogprob | None]]:
        """The read of _choose as (token, its TokenLogprob or None) a row."""
        out, at = [], len(handles)
        for i, h in enumerate(handles):
            token, k = int(values[i]), h.request.logprobs if h is not None else None
            if k is None:
                out.append((token, None))
                continue
            chosen, top = values[at], values[at + 1:at + 1 + k]
            top_ids = values[at + 1 + k:at + 1 + 2 * k]
            at += 1 + 2 * k
            out.append((token, TokenLogprob(token, chosen,
                                            [(int(t), v) for t, v in zip(top_ids, top)])))
        return out

    def _accept(self, h: Handle, token: int, logprob: TokenLogprob | None) -> Event:
        """Take a request's new token: its text, and whether it ends the request."""
        if token in h.eos:
            return self._finish(h, "stop")
        h.tokens.append(token)
        event = Event(h, h.text_of(token), [token], None if logprob is None else [logprob])
        if h.hit_stop:
            return self._finish(h, "stop", event)
        if len(h.tokens) >= h.max_new:
            return self._finish(h, "length", event)
        return event

    def _finish(self, h: Handle, reason: str, event: Event | None = None) -> Event:
        """The request's last event: what was held back (unless cancelled), and its usage."""
        event = event or Event(h, logprobs=[] if h.request.logprobs is not None else None)
        if reason != "cancelled":
            event.text += h.tail()
        h.finish_reason = event.finish_reason = reason
        event.prompt_tokens, event.new_tokens = len(h.request.prompt), len(h.tokens)
        event.ttft_s, event.decode_s = h.ttft_s, h.decode_s
        return event

    def _free(self, row: int) -> None:
        self.slots[row] = None
        self._starts = None

    @staticmethod
    def _deliver(events: list[Event]) -> None:
        for event in events:
            if event.request.request.on_event is not None:
                event.request.request.on_event(event)
