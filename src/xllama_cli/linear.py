"""CPU kernels for a built model's linear layers, chosen by measurement on the machine in use.

A weight can be held in several forms (a `Layout`: as it is; reordered once into oneDNN's blocked
layout; packed by fbgemm as float16; for int8 and int4 weights, those of quantize.py), and each
form is read by one or more products (`Product`). Which one is fastest depends on the CPU, its
thread count, the weight's shape and the number of rows multiplied (decode: one row a sequence,
bound by reading the weights; prefill: many rows, bound by arithmetic), and rules measured on one
CPU are wrong on the next. So `Tuner` times the candidates for each distinct kind and shape of a
model's layers at its first load (on one of the model's own weights), checks every candidate
against F.linear first, and keeps the times in a `Store` (the user's cache folder: see
kernel_cache.py) for later loads, which only check the kept choice again. `use_cpu_kernels` then
swaps each layer for a CpuLinear holding its weight in the chosen form, the way quantize.py swaps
in int8 layers; the model itself is built from plain nn.Linear.

Private ops (oneDNN's `torch.ops.mkldnn.*`, fbgemm's `torch.ops.quantized.*`, ATen's int8/int4
kernels) are tried once per process on a small product (`probed`); a missing or wrong one is no
candidate.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import gemv

# Up to this many rows (batch x new tokens) a product is bound by reading the weights (decode);
# above it (prefill) by arithmetic. Each layer has one product for each side.
SMALL_ROWS = 16
# A layout's cost is that of a prompt of PROMPT_TOKENS tokens followed by as many decode steps;
# the prefill side is timed at the prompt's rows (MANY_ROWS), not at fewer and scaled: a product
# with a fixed cost a call (int4_gemm's widening of the weight) would be misjudged.
PROMPT_TOKENS = 128
MANY_ROWS = PROMPT_TOKENS
# Timing one shape: at least MIN_REPS rounds over its candidates, more while the shape's share of
# the time budget lasts, at most MAX_REPS. The minimum over rounds is kept: other processes only
# ever add time. Times measured while other processes took more than BUSY of the CPUs (which
# slows multi-threaded kernels most, and can rank them wrongly) serve this load but are not kept.
MIN_REPS, MAX_REPS, SECONDS_PER_SHAPE = 3, 12, 0.25
BUSY = 0.10

_PROBES: dict[str, bool] = {}


def probed(name: str, check: Callable[[], bool]) -> bool:
    """Whether the private op `name` works here: `check()` (which compares it with F.linear) runs
    once per process and its answer is kept. A missing op, or one that raises, does not work."""
    if name not in _PROBES:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fbgemm's quantized tensors warn of deprecation
                _PROBES[name] = bool(check())
        except Exception:  # noqa: BLE001 - any failure of a private op means: do not use it
            _PROBES[name] = False
    return _PROBES[name]


def agrees(got: torch.Tensor, want: torch.Tensor, tol: float | None = None) -> bool:
    """A check's verdict: `got` has want's shape and values, to `tol` (default: the rounding of
    got's dtype) relative to want's largest value."""
    if tol is None:
        tol = 1e-4 if got.dtype == torch.float32 else 2e-2
    scale = want.abs().max().item() if want.numel() else 0.0
    return got.shape == want.shape and bool(torch.isfinite(got).all()) and torch.allclose(
        got.float(), want.float(), rtol=tol, atol=tol * scale)


# ---- the products ----
@dataclass(frozen=True)
class Product:
    """x [rows, K] (2-D) @ W.T -> [rows, N] from a weight in one layout's form. `fits(n, k)`:
    whether it serves that shape at all (some private ops fail, or crash the process, on others)."""

    name: str
    run: Callable[[torch.Tensor, Any], torch.Tensor]
    fits: Callable[[int, int], bool] = lambda n, k: True
    many: bool = True  # a candidate for many rows too (a loop built for few rows is not)
    few: bool = True  # a candidate for few rows too (one that widens the weight first is not)


@dataclass(frozen=True)
class Layout:
    """One form a layer's weight can be held in (`prepare(layer)`, once at load time) and the
    products that read it. `works(dtype)`: whether its private ops work here (probed once).
    `keeps_source`: prepare returns the layer's own weight tensor (no copy), the only kind a
    head tied to the embedding table may use. `timed`: a candidate the Tuner measures (not so:
    a layout only asked for by name, e.g. for a compiled step)."""

    name: str
    prepare: Callable[[nn.Module], Any]
    products: tuple[Product, ...]
    works: Callable[[torch.dtype], bool] = lambda dtype: True
    keeps_source: bool = False
    timed: bool = True

    def product(self, name: str) -> Product | None:
        return next((p for p in self.products if p.name == name), None)


@dataclass(frozen=True)
class Kind:
    """A family of weights (float32, bfloat16, float16, int8, int4), its layouts and its
    reference product `reference(x, layer)` (what the layer computes without any of them), which
    every candidate is checked against, to `tol` relative to the largest output."""

    name: str
    layouts: tuple[Layout, ...]
    reference: Callable[[torch.Tensor, nn.Module], torch.Tensor]
    tol: float

    def layout(self, name: str) -> Layout | None:
        return next((lay for lay in self.layouts if lay.name == name), None)


def in_weight_dtype(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A product of one weight tensor that takes x in that tensor's dtype, made to take x in any
    float dtype (float32 activations beside half-precision weights: see use_cpu_kernels) and
    give y in x's. A product that computes in float32 whatever its input (fbgemm's, numba's)
    takes float32 x as it is and needs no such wrapper."""
    def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == weight.dtype:
            return run(x, weight)
        return run(x.to(weight.dtype), weight).to(x.dtype)

    product.__name__ = product.__qualname__ = run.__name__
    return product


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] in oneDNN's blocked layout (an opaque tensor; `.to_dense()` gives it back)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight.T by oneDNN's kernel, for a packed (`pack`) or a plain dense weight."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`onednn_linear` called directly (a custom op's dispatch costs more than a small product
    takes, and imports torch._dynamo at first use), or under torch.compile as one custom op
    (inductor lowers oneDNN's linear only for weights it packed itself)."""
    if torch.compiler.is_compiling():
        return _packed_linear_op(x, weight)
    return onednn_linear(x, weight)


@torch.library.custom_op("xllama::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return onednn_linear(x, weight)


@_packed_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def onednn_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed and dense products give F.linear's results in `dtype` here; for
    bfloat16, also whether the CPU computes it natively (AVX-512 BF16 or AMX: elsewhere oneDNN
    emulates it, which is never the fast candidate and not worth timing)."""
    def check() -> bool:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(48, 40, generator=g), torch.randn(3, 40, generator=g)
        want = F.linear(x.to(dtype).float(), w.to(dtype).float())
        w, x = w.to(dtype), x.to(dtype)
        return agrees(onednn_linear(x, pack(w)), want) and agrees(onednn_linear(x, w), want)

    return dtype in (torch.float32, torch.bfloat16) and probed(f"onednn {dtype}", check)


def fbgemm_fp16_works(dtype: torch.dtype) -> bool:
    """Whether fbgemm's float16-weight product (float32 arithmetic) gives F.linear's results."""
    def check() -> bool:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(48, 40, generator=g).half(), torch.randn(3, 40, generator=g)
        want = F.linear(x, w.float())
        return agrees(fbgemm_fp16_linear(x.to(dtype), fbgemm_fp16_pack(w)).float(), want, 2e-2)

    return dtype in (torch.bfloat16, torch.float16) and probed("fbgemm fp16", check)


def fbgemm_fp16_pack(weight: torch.Tensor) -> Any:
    """weight [N, K] as float16 in fbgemm's packed form (an opaque object). A weight beyond
    float16's range cannot be held so: ValueError (the layer then takes another layout)."""
    w = weight.detach()
    if w.dtype != torch.float16 and w.abs().max().item() >= torch.finfo(torch.float16).max:
        raise ValueError("weight beyond float16's range")
    return torch.ops.quantized.linear_prepack_fp16(w.float(), None)


def fbgemm_fp16_linear(x: torch.Tensor, packed: Any) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(x.float(), packed).to(x.dtype)


def split_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [rows, K] @ weight.T as one batched product over the weight split by rows into one part
    per thread (a view, no copy): ATen's product of few rows runs on one thread, the batched
    one spreads the parts over the threads."""
    n, k = weight.shape
    parts = thread_count()
    if parts == 1 or n % parts or not weight.is_contiguous():
        return F.linear(x, weight)
    rows = x.shape[0]
    y = torch.bmm(x.reshape(1, rows, k).expand(parts, rows, k),
                  weight.view(parts, n // parts, k).transpose(1, 2))
    return y.transpose(0, 1).reshape(rows, n)


def thread_count() -> int:
    """torch's thread count; in a compiled graph, the count as the graph was traced. (Called in
    a traced graph, torch.get_num_threads would split the graph in two at every product.)"""
    return torch.get_num_threads()


# what torch.compiler.assume_constant_result sets, without the compiler's import it makes
thread_count._dynamo_marked_constant = True  # type: ignore[attr-defined]


def splits(n: int, k: int) -> bool:
    return torch.get_num_threads() > 1 and n % torch.get_num_threads() == 0


def is_small(x: torch.Tensor) -> bool:
    """Whether x [..., K] has few enough rows for the weight-streaming paths (CPU only)."""
    return x.device.type == "cpu" and x.numel() <= SMALL_ROWS * x.shape[-1]


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T -> [..., N] for a plain weight in a compiled step: inductor
    fuses a one-row product into one vectorised, multi-threaded GEMV kernel (widening
    half-precision weights in registers, accumulating in float32); several rows take the split
    product (inductor's kernel would read the weights once per row)."""
    n, k = weight.shape
    if not is_small(x):
        return F.linear(x, weight)
    if torch.compiler.is_compiling() and x.numel() == k:
        return (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)
    return split_linear(x.reshape(-1, k), weight).reshape(*x.shape[:-1], n)


def _weight(layer: nn.Module) -> torch.Tensor:
    return layer.weight


def _linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The reference product of a float layer: F.linear in float32, the exact one."""
    return F.linear(x.float(), layer.weight.float())


def _float_kind(dtype: torch.dtype) -> Kind:
    plain = Layout("plain", _weight, (
        Product("aten", in_weight_dtype(F.linear)),
        Product("split", in_weight_dtype(split_linear), splits),
        *((Product("onednn", in_weight_dtype(packed_linear)),) if dtype != torch.float16 else ()),
        *((Product("numba", gemv.float32_linear, gemv.fits, many=False),)
          if dtype == torch.float32 else ()),
        *((Product("numba", gemv.bfloat16_linear, gemv.bfloat16_fits, many=False),)
          if dtype == torch.bfloat16 else ())),
        keeps_source=True)
    # a compiled step's: inductor fuses the one-row product (see matmul)
    compiled = Layout("compiled", _weight, (Product("matmul", matmul),), keeps_source=True,
                      timed=False)
    layouts = [plain, compiled]
    if dtype != torch.float16:
        layouts.append(Layout("onednn", lambda layer: pack(layer.weight),
                              (Product("onednn", in_weight_dtype(packed_linear)),), onednn_works))
    if dtype != torch.float32:  # float16 weights would round float32 ones
        layouts.append(Layout("fbgemm-fp16", lambda layer: fbgemm_fp16_pack(layer.weight),
                              (Product("fbgemm", fbgemm_fp16_linear),), fbgemm_fp16_works))
    return Kind(str(dtype).removeprefix("torch."), tuple(layouts), _linear,
                1e-4 if dtype == torch.float32 else 2e-2)


FLOAT_KINDS = {dt: _float_kind(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}


def kind_of(layer: nn.Module) -> Kind | None:
    """The kernel family of a CPU linear layer (quantize.py's layers name theirs), or None."""
    kind = getattr(layer, "kernel_kind", None)
    if kind is not None:
        return kind
    if type(layer) is nn.Linear and layer.weight.device.type == "cpu":
        return FLOAT_KINDS.get(layer.weight.dtype)
    return None


# ---- the swapped layer ----
@dataclass(frozen=True)
class Choice:
    """A layer's layout and its product for few rows (decode) and for many (prefill)."""

    layout: str
    few: str
    many: str

    def __str__(self) -> str:
        return f"{self.layout}: {self.few} / {self.many}"


class CpuLinear(nn.Module):
    """A linear layer computed by the kernels chosen for it (`choice`): its weight held in the
    chosen layout's form (`state`), multiplied by the few-row or the many-row product. `weight`
    is that form where it is one tensor (as it is, or packed for oneDNN), else the layout's
    first tensor, else an empty tensor of the layer's device and dtype (an fbgemm-packed
    weight is an opaque object). Inference only: several products have no gradient."""

    def __init__(self, source: nn.Module, kind: Kind, choice: Choice, state: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.kind, self.choice = kind.name, choice
        layout = kind.layout(choice.layout)
        self._few = layout.product(choice.few).run
        self._many = layout.product(choice.many).run
        main = state if isinstance(state, torch.Tensor) else next(
            (t for t in (state if isinstance(state, tuple) else ()) if isinstance(t, torch.Tensor)),
            None)
        if main is None:
            main = torch.empty(0, dtype=getattr(source, "dtype", None) or source.weight.dtype)
        self.weight = main if isinstance(main, nn.Parameter) else nn.Parameter(
            main, requires_grad=False)
        self.bias = source.bias
        # kept apart from the module's parameters (a layout that keeps the source weight hands
        # over that Parameter), so that state_dict() has a layer's keys once: weight and bias
        self.state = state.detach() if isinstance(state, nn.Parameter) else state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        run = self._few if x2.shape[0] <= SMALL_ROWS else self._many
        y = run(x2, self.state).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.kind} {self.choice}")


# ---- measuring ----
@dataclass(frozen=True)
class Spec:
    """What one choice serves: the layers of one kind and shape (a head tied to the embedding
    table apart, since only the layouts that keep its tensor may serve it)."""

    kind: str
    n: int
    k: int
    tied: bool = False
    activations: torch.dtype | None = None  # the inputs' dtype, where not the layers' own

    def key(self, rows: int, threads: int, streamed: bool) -> str:
        given = ("" if self.activations is None
                 else f" {str(self.activations).removeprefix('torch.')} inputs")
        return (f"{self.kind} {self.n}x{self.k}{' tied' if self.tied else ''}{given} rows {rows} "
                f"threads {threads} {'streamed' if streamed else 'cached'}")


class Store(Protocol):
    """Where measured times are kept between loads (kernel_cache.KernelCache)."""

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, value: dict) -> None: ...


class MemoryStore:
    """A Store that keeps times for this process only."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value


Candidate = tuple[Layout, Product, str]  # layout, product, "few" | "many"
# (spec, kind, the layers it serves) -> (choice, the first layer's weight prepared for it), or
# (None, None): leave them as they are
Chooser = Callable[[Spec, Kind, "list[nn.Module]"], "tuple[Choice | None, Any]"]


@dataclass
class Tuner:
    """Chooses each Spec's kernels: from the times a Store keeps for this machine, else by timing
    every candidate on the layers at hand. decode_rows: rows a decode step multiplies (sequences
    decoded together; None: no decoding, as in perplexity, where only the many-row side counts).
    stream_bytes: a few-row product is timed over as many of the spec's layers, one after the
    other, as hold this many bytes (twice the CPU's last cache, say), so that their weights come
    from memory as decode meets them, one matrix after another. other_work(): starts a meter
    whose share() is the share of the CPUs other processes took since (machine.OtherWork);
    times measured beside more than BUSY of it are not kept in the store."""

    store: Store = field(default_factory=MemoryStore)
    decode_rows: int | None = 1
    stream_bytes: int = 0
    other_work: Callable[[], Any] | None = None
    measured: list[str] = field(default_factory=list)  # keys timed in this process
    unkept: list[str] = field(default_factory=list)  # of those, the ones measured beside other work

    @property
    def few_rows(self) -> int:
        return min(self.decode_rows or 1, SMALL_ROWS)

    def key(self, spec: Spec, layers: list[nn.Module]) -> str:
        """Where its times are kept: the spec, the rows, the threads, and whether the timed layers
        held stream_bytes (else their weights may have stayed in the CPU's caches)."""
        held = sum(_bytes(lay) for lay in _streamed(layers, self.stream_bytes))
        return spec.key(self.few_rows, torch.get_num_threads(), held >= self.stream_bytes > 0)

    def choose(self, spec: Spec, kind: Kind, layers: list[nn.Module]) -> tuple[Choice | None, Any]:
        """The choice for `spec`, and layers[0]'s weight prepared in the chosen layout (checked
        against the reference product on it, whether the choice was kept or timed now); (None,
        None) where no candidate passes its check: the layers stay as they are."""
        key = self.key(spec, layers)
        kept = self.store.get(key)
        if kept is not None:
            choice = best(kept.get("times", {}), self.decode_rows is not None)
            state = prepared_if_right(kind, layers[0], choice, spec.activations) if choice else None
            if state is not None:
                return choice, state
        times = self.timed(key, lambda: measure(
            kind, _streamed(layers, self.stream_bytes), spec.tied, self.few_rows,
            spec.activations))
        choice = best(times, self.decode_rows is not None)
        state = prepared_if_right(kind, layers[0], choice, spec.activations) if choice else None
        return (choice, state) if state is not None else (None, None)

    def timed(self, key: str, run: Callable[[], dict]) -> dict:
        """run()'s times ({layout: {side: {name: seconds}}}), kept in the store under `key`
        unless other processes took more than BUSY of the CPUs meanwhile."""
        meter = self.other_work() if self.other_work else None
        times = run()
        busy = meter.share() if meter else None
        self.measured.append(key)
        if busy is not None and busy > BUSY:
            self.unkept.append(key)
        else:
            self.store.put(key, {"times": times})
        return times


def _bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(layer))


def _streamed(layers: list[nn.Module], nbytes: int) -> list[nn.Module]:
    """The first of `layers` that together hold `nbytes` (at least one; all, if they hold less)."""
    out, held = [], 0
    for layer in layers:
        if out and held >= nbytes:
            break
        out.append(layer)
        held += _bytes(layer)
    return out


def best(times: Mapping[str, Mapping[str, Mapping[str, float]]], decoding: bool) -> Choice | None:
    """The layout of least cost (PROMPT_TOKENS decode steps and a prompt as long; the prompt alone
    when not `decoding`) among times[layout][few|many][product] (seconds), with its fastest
    product on each side. None when no layout has a product on both sides."""
    found: list[tuple[float, Choice]] = []
    for layout, sides in times.items():
        few, many = sides.get("few") or {}, sides.get("many") or {}
        if not few or not many:
            continue
        f, m = min(few, key=few.get), min(many, key=many.get)
        cost = many[m] * PROMPT_TOKENS / MANY_ROWS + (few[f] * PROMPT_TOKENS if decoding else 0)
        found.append((cost, Choice(layout, f, m)))
    return min(found, key=lambda c: c[0])[1] if found else None


def prepared_if_right(kind: Kind, layer: nn.Module, choice: Choice,
                      activations: torch.dtype | None = None) -> Any | None:
    """`layer`'s weight in the choice's layout, if that layout and both its products exist here
    and agree with the reference product on it (for inputs in `activations`, if given, else in
    the layer's own compute dtype); else None."""
    layout = kind.layout(choice.layout)
    if layout is None or not layout.works(_compute_dtype(layer)):
        return None
    products = [layout.product(choice.few), layout.product(choice.many)]
    if None in products or not all(p.fits(layer.out_features, layer.in_features) for p in products):
        return None
    try:
        state = _prepare(layout, layer)
    except Exception:  # noqa: BLE001 - a weight this layout cannot hold (e.g. beyond float16)
        return None
    rows = {"few": SMALL_ROWS // 2, "many": SMALL_ROWS + 3}
    dtype = activations or _compute_dtype(layer)
    if all(_right(kind, layer, p, state, rows[side], dtype) for p, side in zip(products, rows)):
        return state
    return None


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of the activations a layer takes (a quantized layer's compute dtype)."""
    return getattr(layer, "dtype", None) or layer.weight.dtype


def _prepare(layout: Layout, layer: nn.Module) -> Any:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fbgemm's quantized tensors warn of deprecation
        return layout.prepare(layer)


def _right(kind: Kind, layer: nn.Module, product: Product, state: Any, rows: int,
           dtype: torch.dtype) -> bool:
    """Whether `product` on `state` gives the reference product of `layer` on random rows in
    `dtype`, in that dtype."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, layer.in_features, generator=g).to(dtype)
    try:
        with torch.no_grad():
            got = product.run(x, state)
            want = kind.reference(x, layer)
    except Exception:  # noqa: BLE001 - a product that fails on this shape is no candidate
        return False
    return got.dtype == dtype and agrees(got, want.float(), kind.tol)


def measure(kind: Kind, layers: list[nn.Module], tied: bool, few_rows: int,
            activations: torch.dtype | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Seconds per call of every candidate product for layers of one shape that passes its check
    on layers[0]: times[layout][few|many][product]; few at `few_rows` rows, one call per layer in
    turn (each layer's weight prepared in each layout for it), many at MANY_ROWS on layers[0].
    Rounds alternate the candidates, so that a change in the machine's load affects them alike;
    each keeps its fastest round. Inputs are in `activations` if given, else in the layers'
    compute dtype."""
    first = layers[0]
    dtype = _compute_dtype(first)
    given = activations or dtype
    n, k = first.out_features, first.in_features
    g = torch.Generator().manual_seed(0)
    xs = {"few": torch.randn(few_rows, k, generator=g).to(given),
          "many": torch.randn(MANY_ROWS, k, generator=g).to(given)}
    states: dict[str, list[Any]] = {}
    candidates: list[Candidate] = []
    for layout in kind.layouts:
        if not layout.timed or (tied and not layout.keeps_source) or not layout.works(dtype):
            continue
        try:
            states[layout.name] = [_prepare(layout, lay) for lay in layers]
        except Exception:  # noqa: BLE001 - these weights cannot take this layout
            continue
        for p in layout.products:
            if not p.fits(n, k):
                continue
            for side, rows in (("few", SMALL_ROWS // 2), ("many", SMALL_ROWS + 3)):
                if not (p.many if side == "many" else p.few):
                    continue
                if _right(kind, first, p, states[layout.name][0], rows, given):
                    candidates.append((layout, p, side))
    best_s: dict[Candidate, float] = {c: math.inf for c in candidates}
    spent, reps = 0.0, 0
    with torch.no_grad():
        for layout, product, side in candidates:  # a first call, untimed: set-up inside the ops
            product.run(xs[side], states[layout.name][0])
        while reps < MIN_REPS or (reps < MAX_REPS and spent < SECONDS_PER_SHAPE):
            for c in candidates:
                layout, product, side = c
                run = states[layout.name] if side == "few" else states[layout.name][:1]
                t0 = time.perf_counter()
                for state in run:
                    product.run(xs[side], state)
                dt = time.perf_counter() - t0
                best_s[c] = min(best_s[c], dt / len(run))
                spent += dt
            reps += 1
    times: dict[str, dict[str, dict[str, float]]] = {}
    for (layout, product, side), s in best_s.items():
        times.setdefault(layout.name, {}).setdefault(side, {})[product.name] = s
    return times


# ---- swapping ----
def use_cpu_kernels(model: nn.Module, tuner: Tuner | None = None,
                    release: Callable[[torch.Tensor], None] | None = None,
                    choose: Chooser | None = None, activations: torch.dtype | None = None
                    ) -> nn.Module:
    """Swap every CPU linear layer of a known kind (`kind_of`: nn.Linear in float32, bfloat16 or
    float16; quantize.py's int8 and int4 layers) for a CpuLinear with the kernels `tuner` chooses
    for its kind and shape (or `choose(spec, kind, layers)`), measured and checked for inputs in
    `activations` (e.g. float32 beside half-precision weights, as llama.cpp computes), if given,
    else in each layer's own compute dtype. Whichever they were chosen for, the swapped layers
    take inputs in either and give outputs in their inputs' dtype. The largest shapes first, one
    matrix at a time, so that the source form of few matrices exists beside the swapped model;
    `release(weight)` is called for a source weight once it is no longer used (e.g. to drop a
    memory-mapped checkpoint's pages it read). Other devices keep their layers, whose products
    are already the fast ones there."""
    choose = choose or (tuner or Tuner()).choose
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[Spec, list[tuple[nn.Module, str, nn.Module]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            kind = kind_of(child)
            if kind is not None:
                spec = spec_of(child, kind, activations, id(child.weight) in tied)
                groups.setdefault(spec, []).append((parent, name, child))
    for spec in sorted(groups, key=lambda s: -s.n * s.k):
        members = groups.pop(spec)
        kind = kind_of(members[0][2])
        choice, state = choose(spec, kind, [layer for _, _, layer in members])
        if choice is None:  # nothing serves them here: the layers stay as they are
            continue
        layout = kind.layout(choice.layout)
        for i in range(len(members)):
            # taken from the list, so that a swapped layer's own tensors are freed now
            (parent, name, layer), members[i] = members[i], None
            if i > 0:
                try:
                    state = _prepare(layout, layer)
                except Exception:  # noqa: BLE001 - this one weight cannot take the layout
                    continue  # (e.g. beyond float16's range): it stays as it is
            setattr(parent, name, CpuLinear(layer, kind, choice, state))
            if release is not None and not layout.keeps_source:
                for t in _tensors(layer):
                    release(t)
            del layer, state
    return model


def spec_of(layer: nn.Module, kind: Kind, activations: torch.dtype | None = None,
            tied: bool = False) -> Spec:
    """The Spec a layer of `kind` is chosen under, for inputs in `activations` (as
    use_cpu_kernels's)."""
    given = activations if activations != _compute_dtype(layer) else None
    return Spec(kind.name, layer.out_features, layer.in_features, tied, given)


def _tensors(layer: nn.Module) -> Iterable[torch.Tensor]:
    return [t for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False))
            if t is not None]


COMPILED = Choice("compiled", "matmul", "matmul")  # plain float weights for a compiled step


def fixed(choice: Choice) -> Chooser:
    """A `choose` for use_cpu_kernels that gives every layer `choice` (tests; COMPILED), checked
    like any other: layers it cannot serve stay as they are."""
    def choose(spec: Spec, kind: Kind, layers: list[nn.Module]) -> tuple[Choice | None, Any]:
        state = prepared_if_right(kind, layers[0], choice, spec.activations)
        return (choice, state) if state is not None else (None, None)
    return choose
