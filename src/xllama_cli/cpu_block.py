"""A CPU decode step's block as one numba call: its two norms, its four products, its attention
(cpu_attention.py's loop), SwiGLU and the residual sums, where each of the block's products is one
of the numba loops (vnni.py's int4 and int8 forms, gemv.py's bf16 and float32 loops).

Through the modules, a block's one-token step is some eighty ATen ops and module calls between
its products (norms, SiLU, the sums, splits and views, each product's conversions and thread
setting), each with a fixed cost that one row's arithmetic does not hide; a block's products,
each already a numba loop, are here called from numba code instead, with the work between them
as plain loops over buffers shared by the layers. The products and the attention are the same
compiled loops either way; only the norms, SiLU and the sums are computed anew (in float32, as
the modules compute them; summation order differs).

Like the fused attention, it is applied to a built model from outside (`use_block_step`): each
block it serves computes with it (`Block.fused_step`) for one-token steps of few rows, and keeps
its modules for everything else (prompts, more rows). It is checked against the modules' step on
the model's own first block and its weights, and given only where measured faster on this
machine (times kept with the products' in the kernel cache)."""

from __future__ import annotations

from functools import cache
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import gemv, vnni
from .cpu_attention import (FusedStep, _loop as _attention_loop, kept_or_timed, random_cache,
                            serves_block, slots_error)
from .fuse import Stacked
from .jit import NO_SCALES, numba_module, on_torch_threads
from .linear import (SMALL_ROWS, Choice, Chooser, CpuLinear, Kind, Spec, Tuner, agrees, kind_of,
                     prepared_if_right, spec_of)
from .model import MLP, Block, RMSNorm, Transformer

TIMED_SLOTS = 512  # filled cache slots a timed step attends over (at most the model's context)
# How near the modules' output a step must come, relative to its largest: float loops, to float32
# rounding; int8 and int4 forms' loops round their activations to int8, where a norm summed in
# another order can move one activation a step (1/127 of its group's largest)
TOLERANCE = {"float": 1e-4, "int": 1e-2}

# The loops a compiled block calls, set before each call (numba reads globals as it compiles, and a
# block is compiled for the loops it was first called with; its name says which: _block)
_P0: Any = None  # q, k and v
_P1: Any = None  # o
_P2: Any = None  # gate and up
_P3: Any = None  # down
_ATTEND: Any = None
_NORM: Any = None  # the norm and the bias sum (_helpers)
_ADD: Any = None


# the few-row products that are numba loops (which a block step can call): (kind, layout) ->
# their names
LOOPS = {("float32", "plain"): ("numba",), ("bfloat16", "plain"): ("numba",),
         ("int8", "vnni"): ("vnni", "avx2"), ("int4", "vnni"): ("vnni", "avx2")}


def product_loop(layer: nn.Module) -> tuple[str, Any, np.ndarray, np.ndarray] | None:
    """A layer's few-row product as a numba loop (jit.NO_SCALES's signature): its name, the loop,
    and the weight form and scales it takes; None where the layer's product is not one."""
    if not isinstance(layer, CpuLinear) or layer.weight.device.type != "cpu":
        return None
    choice, state = layer.choice, layer.state
    if choice.few not in LOOPS.get((layer.kind, choice.layout), ()):
        return None
    if choice.layout == "vnni":
        kernels = vnni._kernels(choice.few)
        if kernels is None:
            return None
        scales = state[1].numpy() if layer.kind == "int8" else NO_SCALES
        return f"{layer.kind}-{choice.few}", kernels[layer.kind].loop, state[0].numpy(), scales
    if state.is_contiguous():
        if layer.kind == "float32" and gemv._kernel() is not None:
            return "float32", gemv._kernel().loop, state.numpy(), NO_SCALES
        if layer.kind == "bfloat16" and gemv._bf16_kernel() is not None:
            bits = state.view(torch.int16).numpy().view(np.uint16)
            return "bfloat16", gemv._bf16_kernel().loop, bits, NO_SCALES
    return None


@cache
def _block(name: str) -> Callable[..., bool] | None:
    """The block step compiled for the loops `name` names (at its first call, with _P0.._P3 and
    _ATTEND set to them: BlockStep does), or None where numba is not usable."""
    numba = numba_module()
    if numba is None:
        return None
    global _NORM, _ADD
    # globals, not a closure's cells: numba's on-disk cache keys on cells, and with them the
    # block compiled again in every process
    _NORM, _ADD = _helpers()

    def step(x, out, norms, eps, w0, s0, b0, w1, s1, b1, w2, s2, b2, w3, s3, b3,
             cos, sin, kc, vc, row, pos, h, qkv, att, o, gu, act):
        """x float32 [B, dim] -> out [B, dim], a Block's step of one token a row (its weights:
        norms [2, dim]; for q/k/v, o, gate/up and down, the loop's w and s and a bias, [0] for
        none). cos, sin, kc, vc, row, pos: as cpu_attention's loop. h..act: buffers of the
        products' outputs. False, and nothing written, where a slot is not in the cache."""
        rows, dim = x.shape
        _NORM(x, norms[0], eps, h)
        _P0(h, w0, s0, qkv)
        _ADD(qkv, b0)
        if not _ATTEND(qkv, cos, sin, kc, vc, row, pos, att):
            return False
        _P1(att, w1, s1, o)
        _ADD(o, b1)
        for r in range(rows):
            for j in range(dim):
                out[r, j] = x[r, j] + o[r, j]
        _NORM(out, norms[1], eps, h)
        _P2(h, w2, s2, gu)
        _ADD(gu, b2)
        hidden = act.shape[1]
        for r in range(rows):  # SwiGLU: silu(gate) * up
            for j in range(hidden):
                g = gu[r, j]
                act[r, j] = g / (np.float32(1.0) + np.exp(-g)) * gu[r, hidden + j]
        _P3(act, w3, s3, o)
        _ADD(o, b3)
        for r in range(rows):
            for j in range(dim):
                out[r, j] += o[r, j]
        return True

    # numba's cache names its files after the function: one name per set of loops
    step.__qualname__ = f"step.{name}"
    return on_torch_threads(numba.njit(fastmath=True, cache=True, nogil=True,
                                       boundscheck=False)(step))


@cache
def _helpers() -> tuple[Any, Any]:
    """The block step's norm and bias sum, inlined into it."""
    numba = numba_module()

    @numba.njit(inline="always", fastmath=True, boundscheck=False)
    def norm(x, weight, eps, out):
        """out = weight * x / sqrt(mean(x^2) + eps), each row (model.RMSNorm in float32)."""
        for r in range(x.shape[0]):
            total = np.float32(0.0)
            for j in range(x.shape[1]):
                total += x[r, j] * x[r, j]
            inv = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[1]) + eps)
            for j in range(x.shape[1]):
                out[r, j] = weight[j] * (x[r, j] * inv)

    @numba.njit(inline="always", fastmath=True, boundscheck=False)
    def add(y, bias):
        if bias.shape[0]:
            for r in range(y.shape[0]):
                for j in range(y.shape[1]):
                    y[r, j] += bias[j]

    return norm, add


class _Buffers:
    """The products' outputs of a step, shared by a model's blocks (one block computes at a
    time), for the rows of the last step."""

    def __init__(self) -> None:
        self.arrays: tuple[np.ndarray, ...] = ()

    def get(self, rows: int, widths: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        if tuple(a.shape for a in self.arrays) != tuple((rows, w) for w in widths):
            self.arrays = tuple(np.empty((rows, w), np.float32) for w in widths)
        return self.arrays


class BlockStep:
    """A Block's one-token step through its compiled loop (`Block.fused_step`), for a block that
    `serves` accepts; it shares the per-step arrays of the block's fused attention step, and
    `buffers` with the model's other blocks."""

    def __init__(self, block: Block, buffers: _Buffers) -> None:
        attn, mlp = block.self_attn, block.mlp
        layers = _block_layers(block)
        loops = [product_loop(layer) for layer in layers]
        assert all(loops), "a block whose products are not all loops (serves)"
        self.name = ".".join(loop[0] for loop in loops)
        self.loops = tuple(loop[1] for loop in loops)
        self.attn = attn  # its fused attention step's per-step arrays, and its kv_cache (which
        # setup_cache replaces), are read at each call
        self.buffers = buffers
        norms = torch.stack([block.input_layernorm.weight.detach(),
                             block.post_attention_layernorm.weight.detach()])
        self.eps = np.float32(block.input_layernorm.eps)
        weights: list[Any] = [norms.numpy(), self.eps]
        for layer, loop in zip(layers, loops):
            bias = layer.bias.detach().float().contiguous() if layer.bias is not None else None
            weights += [loop[2], loop[3], bias.numpy() if bias is not None else NO_SCALES]
        self.weights = tuple(weights)  # (numpy's arrays keep their tensors alive)
        heads = attn.n_heads * attn.head_dim
        self.widths = (norms.shape[1], attn.qkv.layer.out_features, heads, norms.shape[1],
                       mlp.gate_up.layer.out_features, mlp.down_proj.in_features)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 start: int | torch.Tensor, row: int) -> torch.Tensor | None:
        """x float32 [B, 1, dim] -> the block's output, or None for more rows than few."""
        B = x.shape[0]
        if B > SMALL_ROWS or x.dtype != torch.float32:
            return None
        cache_ = self.attn.kv_cache
        assert cache_ is not None, "call model.setup_cache() before using start="
        cos_rows, sin_rows, pos = self.attn.fused_step.step_arrays(cos, sin, start, B)
        x2 = x.reshape(B, -1)
        x2 = x2 if x2.is_contiguous() else x2.contiguous()
        out = torch.empty_like(x2)
        h, qkv, att, o, gu, act = self.buffers.get(B, self.widths)
        global _P0, _P1, _P2, _P3, _ATTEND
        _P0, _P1, _P2, _P3 = self.loops
        _ATTEND = _attention_loop().loop
        k, v = cache_.k, cache_.v
        if row < 0 or row + B > k.shape[0] or not _block(self.name)(
                x2.numpy(), out.numpy(), *self.weights, cos_rows, sin_rows, k.numpy(), v.numpy(),
                row, pos, h, qkv, att, o, gu, act):
            raise slots_error(pos, row, cache_)
        return out.view(B, 1, -1)


def serves(block: nn.Module) -> bool:
    """Whether a block's step can be one call: it has the fused attention step (cpu_attention),
    q/k/v and gate/up stacked, every product a numba loop, float32 norms, and no hooks (tensor
    parallelism's all-reduce is one, which a call would skip)."""
    if (not isinstance(block, Block) or not isinstance(block.self_attn.fused_step, FusedStep)
            or not _stacked_without_hooks(block)):
        return False
    norms = (block.input_layernorm, block.post_attention_layernorm)
    if any(type(n) is not RMSNorm or n.weight.dtype != torch.float32 for n in norms):
        return False
    return numba_module() is not None and all(product_loop(lay) for lay in _block_layers(block))


def _stacked_without_hooks(block: Block) -> bool:
    """A block with q/k/v and gate/up stacked (fuse.py), a plain MLP, and no forward hooks
    (tensor parallelism adds its all-reduce as hooks, before the CPU kernels: a block step would
    skip them)."""
    attn, mlp = block.self_attn, block.mlp
    return (isinstance(attn.qkv, Stacked) and type(mlp) is MLP and isinstance(mlp.gate_up, Stacked)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in block.modules()))


def give_block_step(model: Transformer) -> int:
    """Give every block that `serves` its one-call step, unmeasured; how many."""
    buffers = _Buffers()
    blocks = [b for b in model.model.layers if serves(b)]
    for block in blocks:
        block.fused_step = BlockStep(block, buffers)
    return len(blocks)


def use_block_step(model: Transformer, tuner: Tuner) -> bool:
    """Give every block that `serves` its one-call step, where it agrees with the modules' step on
    the model's first such block (its weights, a cache of TIMED_SLOTS random slots) and is the
    faster for the tuner's decode rows: as kept in its store, else measured now (and kept as the
    tuner keeps a product's times). Whether it was given."""
    blocks = [b for b in model.model.layers if serves(b)]
    if not blocks or tuner.decode_rows is None:
        return False
    block, cfg, rows = blocks[0], model.config, tuner.decode_rows
    if rows > SMALL_ROWS:
        return False
    step = BlockStep(block, _Buffers())
    slots = min(TIMED_SLOTS, cfg.max_seq_len)
    key = (f"block {step.name} {cfg.dim}x{cfg.hidden_dim} heads {cfg.n_heads}x{cfg.head_dim} "
           f"kv {cfg.n_kv_heads} rows {rows} threads {torch.get_num_threads()} slots {slots}")
    plain, fused = _bench(model, block, step, rows, slots)
    if not agrees(fused(), plain(), TOLERANCE["int" if "int" in step.name else "float"]):
        return False
    times = kept_or_timed(tuner, key, "block", lambda: {"plain": plain, "fused": fused})
    if times is None or times["fused"] >= times["plain"]:
        return False
    give_block_step(model)
    return True


def _bench(model: Transformer, block: Block, step: BlockStep, rows: int, slots: int
           ) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """A step of `block` over `slots` filled slots of a random cache of its own: through its
    modules, and through `step` (each writing the same new slot)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    cache_ = random_cache(cfg, rows, slots, gen)
    x = torch.randn(rows, 1, cfg.dim, generator=gen)
    start = slots - 1
    cos, sin = model.model.rotary(torch.full((rows, 1), start), torch.float32)

    def run(fused: bool) -> torch.Tensor:
        attn = block.self_attn
        kept, attn.kv_cache = attn.kv_cache, cache_
        kept_step, block.fused_step = block.fused_step, step if fused else None
        try:
            with torch.inference_mode():
                return block(x, cos, sin, None, start)
        finally:
            attn.kv_cache, block.fused_step = kept, kept_step

    return (lambda: run(False)), (lambda: run(True))


# ---- choosing the products for the block step ----
def prefer_loops(model: Transformer, tuner: Tuner, activations: torch.dtype | None) -> Chooser:
    """tuner.choose for use_cpu_kernels, except that each block product's shape gets its fastest
    numba loop where the tuner chose another product and the block step over loops was measured
    faster than the modules over the tuner's choices. The tuner times each shape's product
    alone, which leaves out what the block step saves between products; so the first blocks
    (as many as hold tuner.stream_bytes, as a timed product's layers) are built both ways and
    timed (kept in the store). Call after fuse.fuse_projections, before use_cpu_kernels."""
    chosen: dict[Spec, tuple[Choice | None, Any]] = {}  # each with block 0's layer's state
    first: dict[Spec, nn.Module] = {}

    def choose(spec: Spec, kind: Kind, layers: list[nn.Module]) -> tuple[Choice | None, Any]:
        if spec not in chosen:
            return tuner.choose(spec, kind, layers)
        choice, state = chosen.pop(spec)
        if choice is not None and layers[0] is not first[spec]:  # (a head of the same shape
            state = prepared_if_right(kind, layers[0], choice, spec.activations)  # comes first)
        return (choice, state) if state is not None else (None, None)

    groups = _block_groups(model, activations)
    if groups is None or numba_module() is None or not 0 < (tuner.decode_rows or 0) <= SMALL_ROWS:
        return choose
    loops: dict[Spec, Choice] = {}
    for spec, (kind, layers) in groups.items():
        chosen[spec], first[spec] = tuner.choose(spec, kind, layers), layers[0]
        kept = tuner.store.get(tuner.key(spec, layers))
        loop = _fastest_loop(kind.name, kept["times"]) if kept else None
        if chosen[spec][0] is None or loop is None:
            return choose  # (the tuner's choices, made once)
        loops[spec] = loop
    if all(loops[spec] == chosen[spec][0] for spec in groups):
        return choose
    faster = _loops_faster(model, tuner, groups, {s: c for s, (c, _) in chosen.items()}, loops)
    if faster:
        for spec, (kind, layers) in groups.items():
            state = (prepared_if_right(kind, layers[0], loops[spec], spec.activations)
                     if loops[spec] != chosen[spec][0] else None)
            if state is not None:  # (else the loop failed its check: the tuner's choice stays)
                chosen[spec] = (loops[spec], state)
    return choose


def _block_layers(block: Block) -> tuple[nn.Module, ...]:
    attn, mlp = block.self_attn, block.mlp
    return attn.qkv.layer, attn.o_proj, mlp.gate_up.layer, mlp.down_proj


def _block_groups(model: Transformer, activations: torch.dtype | None
                  ) -> dict[Spec, tuple[Kind, list[nn.Module]]] | None:
    """The block products' specs and layers (block by block), where every block could take the
    block step once its products are loops; else None."""
    groups: dict[Spec, tuple[Kind, list[nn.Module]]] = {}
    for block in model.model.layers:
        if not _stacked_without_hooks(block) or not serves_block(block):
            return None
        for layer in _block_layers(block):
            kind = kind_of(layer)
            if kind is None or torch.float32 not in (activations, getattr(torch, kind.name, None)):
                return None  # the block step computes in float32
            spec = spec_of(layer, kind, activations)
            groups.setdefault(spec, (kind, []))[1].append(layer)
    return groups or None


def _fastest_loop(kind: str, times: dict) -> Choice | None:
    """The layout with a loop among a spec's times ({layout: {side: {name: s}}}), with its
    fastest loop for few rows and its fastest product for many; None where none has one."""
    found = []
    for layout, sides in times.items():
        few = {name: t for name, t in (sides.get("few") or {}).items()
               if name in LOOPS.get((kind, layout), ())}
        many = sides.get("many") or {}
        if few and many:
            f = min(few, key=few.get)
            found.append((few[f], Choice(layout, f, min(many, key=many.get))))
    return min(found, key=lambda c: c[0])[1] if found else None


def _loops_faster(model: Transformer, tuner: Tuner,
                  groups: dict[Spec, tuple[Kind, list[nn.Module]]], chosen: dict[Spec, Choice],
                  loops: dict[Spec, Choice]) -> bool:
    """Whether the first blocks' step is faster over `loops` by the block step than over the
    tuner's `chosen` products by the modules (both with the fused attention step): as kept in
    the tuner's store, else measured now where the two agree (and kept as a product's times)."""
    cfg, rows = model.config, tuner.decode_rows
    blocks, held = [], 0
    for block in model.model.layers:  # as many as hold stream_bytes, as a product is timed
        if blocks and held >= tuner.stream_bytes:
            break
        blocks.append(block)
        held += sum(t.numel() * t.element_size() for layer in _block_layers(block)
                    for t in layer.parameters())
    names = ",".join(f"{spec.n}x{spec.k} {chosen[spec]} or {loops[spec]}" for spec in groups)
    key = (f"block loops {names} heads {cfg.n_heads}x{cfg.head_dim} kv {cfg.n_kv_heads} rows "
           f"{rows} threads {torch.get_num_threads()} blocks {len(blocks)}")
    def paths() -> dict[str, Callable[[], torch.Tensor]] | None:
        built = _bench_blocks(model, blocks, groups, chosen, loops, rows)
        float32 = all(spec.kind == "float32" for spec in groups)
        if built is None or not agrees(built["loops"](), built["chosen"](),
                                       1e-4 if float32 else 2e-2):
            return None
        return built

    times = kept_or_timed(tuner, key, "block", paths, ("chosen", "loops"))
    return times is not None and times["loops"] < times["chosen"]


def _bench_blocks(model: Transformer, blocks: list[Block],
                  groups: dict[Spec, tuple[Kind, list[nn.Module]]], chosen: dict[Spec, Choice],
                  loops: dict[Spec, Choice], rows: int
                  ) -> dict[str, Callable[[], torch.Tensor]] | None:
    """A one-token step of `blocks` (each over TIMED_SLOTS filled slots of a random cache of its
    own, its norms in float32): through the modules over the `chosen` products ("chosen"), and
    through the block step over the `loops` ("loops"); None where a layer takes either badly."""
    cfg = model.config
    spec_of_layer = {id(layer): (spec, kind) for spec, (kind, layers) in groups.items()
                     for layer in layers}
    built: dict[str, list[tuple[nn.Module, ...]]] = {"chosen": [], "loops": []}
    for name, choices in (("chosen", chosen), ("loops", loops)):
        for block in blocks:
            swapped = []
            for layer in _block_layers(block):
                spec, kind = spec_of_layer[id(layer)]
                state = prepared_if_right(kind, layer, choices[spec], spec.activations)
                if state is None:
                    return None
                swapped.append(CpuLinear(layer, kind, choices[spec], state))
            built[name].append(tuple(swapped))
    gen = torch.Generator().manual_seed(0)
    slots = min(TIMED_SLOTS, cfg.max_seq_len)
    caches = [random_cache(cfg, rows, slots, gen) for _ in blocks]
    norms = [(_float32(b.input_layernorm), _float32(b.post_attention_layernorm)) for b in blocks]
    x = torch.randn(rows, 1, cfg.dim, generator=gen)
    start = slots - 1
    cos, sin = model.model.rotary(torch.full((rows, 1), start), torch.float32)
    attention, buffers = FusedStep(), _Buffers()
    steps: list[BlockStep] = []  # built at the first run over the loops

    def run(name: str) -> torch.Tensor:
        kept = [(_block_layers(b), b.input_layernorm, b.post_attention_layernorm,
                 b.self_attn.kv_cache) for b in blocks]
        try:
            y = x
            for block, layers, norm, cache_ in zip(blocks, built[name], norms, caches):
                _install(block, layers)
                block.input_layernorm, block.post_attention_layernorm = norm
                block.self_attn.kv_cache, block.self_attn.fused_step = cache_, attention
                if name == "loops" and len(steps) < len(blocks):
                    steps.append(BlockStep(block, buffers))
                block.fused_step = steps[blocks.index(block)] if name == "loops" else None
                with torch.inference_mode():
                    y = block(y, cos, sin, None, start)
            return y
        finally:
            for block, (layers, first, second, cache_) in zip(blocks, kept):
                _install(block, layers)
                block.input_layernorm, block.post_attention_layernorm = first, second
                block.self_attn.kv_cache, block.self_attn.fused_step = cache_, None
                block.fused_step = None

    return {"chosen": lambda: run("chosen"), "loops": lambda: run("loops")}


def _install(block: Block, layers: tuple[nn.Module, ...]) -> None:
    """Give a block's four products the layers `layers` (as _block_layers orders them)."""
    attn, mlp = block.self_attn, block.mlp
    attn.qkv.layer, attn.o_proj, mlp.gate_up.layer, mlp.down_proj = layers


def _float32(norm: nn.Module) -> nn.Module:
    out = RMSNorm(norm.weight.shape[0], norm.eps)
    out.weight = nn.Parameter(norm.weight.detach().float(), requires_grad=False)
    return out
