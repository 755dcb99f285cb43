"""int4 and int8 weights multiplied by a decode step's few rows with the CPU's 8-bit dot product
(AVX-512 VNNI's vpdpbusd, else AVX2's), as llama.cpp's Q4_0 and Q8_0 products do: each row of
activations is quantized to int8 in groups of 32, and 64 weights at a time are multiplied by them
in integers.

ATen's int4 kernel (`_weight_int4pack_mm_for_cpu`) dequantizes every weight to floating point in
registers, and it, fbgemm's and ATen's int8 products read a decode step's weights well under the
memory's pace. This module holds each weight in a row-major form of its own, written for its
loop: a row is one stream of bytes that the loop reads front to back, asking the memory for the
bytes PREFETCH ahead as it goes (without that, the int4 loop is far slower: README, "The
products' pace"). numba compiles the loops with LLVM for the CPU in use (no C++ compiler); the dot
products are LLVM's x86 intrinsics: AVX-512 VNNI's vpdpbusd, or on a CPU with AVX2 only the pair
llama.cpp's AVX2 path uses (vpmaddubsw, vpmaddwd), and the forms are offered only where the CPU
has one of them (`usable`). A prompt's many rows widen the same form to bf16 a chunk of rows at a
time for oneDNN's GEMM, as int4_gemm.py does for int4pack's. Rounding the activations to int8
costs about 1% of the largest output (as llama.cpp's Q8_0 activations do); linear.py checks each
product against the dequantized weights' float32 one, to the kind's tolerance, before use.

int4 (quantize.quantize_int4: in group g of a row, w = (q - 8) s + z). With x = d xq in each
group (xq int8, d = max |x| / 127), a row's product is
sum_g s d (q . xq) + sum_g (z - 8 s) (the sum of the group's x): an integer dot of unsigned
nibbles by signed bytes, vpdpbusd's operands. The form (`pack`), per row: groups four at a time
(a block, 64 bytes), padded with zero groups to a whole number of UNROLL blocks. Byte j of a
block's first 32 holds group 0's weight j in its low nibble and group 1's in its high one; bytes
32..63 likewise groups 2 and 3. So a block's low nibbles are groups 0 and 2 in order and its high
ones groups 1 and 3: the activations, their scales and sums are laid out in that order (SLOTS),
and the groups' scales and zeros too, which follow the row's blocks, bf16, four a block.

int8 (quantize.quantize_int8: w = q s, a scale a row). Held as q' = q + 128, unsigned, so that
vpdpbusd takes the weights as they are: a row's product is s (sum_g d (q' . xq) - C), where
C = 128 sum_g d (the sum of the group's xq) is the same for every row, computed once a call. The
form (`pack_int8`): each row padded with zero weights to a whole number of UNROLL blocks of 64."""

from __future__ import annotations

from functools import cache
from typing import Any, Callable

import numpy as np
import torch

from .int4_gemm import scratch
from .jit import NO_SCALES, emitter, numba_module, on_torch_threads

GROUP = 32  # weights (and activations) that share a scale: quantize.GROUP
BLOCK_GROUPS = 4  # groups a block holds (64 bytes of nibbles)
UNROLL = 2  # blocks a loop iteration takes, each into its own accumulator
PREFETCH = 4096  # bytes ahead of the block being read that the loop asks the memory for
BLOCK_BYTES = 64 + 2 * 2 * BLOCK_GROUPS  # a block's nibbles, and its four bf16 scales and zeros
SLOTS = (0, 2, 1, 3)  # where a block's group i goes in the order the loop reads them
FEATURES = ("avx512f", "avx512bw", "avx512vnni")  # what vpdpbusd needs (else AVX2's path)
CHUNK_WEIGHTS = 1 << 21  # weights widened at once for many rows (4 MiB of bf16)

_INT4_ROW: Any = None  # the loops' intrinsics (_intrinsics), made with the loops
_INT8_ROW: Any = None
_QUANTIZE: Any = None  # the activations' pass both products share


def usable() -> bool:
    """Whether the loops can run here: numba, and an x86 CPU with AVX-512 VNNI or AVX2."""
    return _isa() is not None and _kernels(_isa()) is not None


def isas() -> tuple[str, ...]:
    """The instruction sets the loops can be written with here, best first: a CPU with AVX-512
    VNNI has AVX2 too, and which is faster is measured (it is not always vpdpbusd's: README)."""
    return {"vnni": ("vnni", "avx2"), "avx2": ("avx2",)}.get(_isa(), ())


@cache
def _isa() -> str | None:
    """The instructions the loops are written with for the CPU numba compiles for: "vnni"
    (AVX-512 VNNI's vpdpbusd), else "avx2" (vpmaddubsw and vpmaddwd, as llama.cpp's AVX2 path),
    else None. That CPU is the host, unless NUMBA_CPU_NAME or NUMBA_CPU_FEATURES name another:
    where LLVM cannot select an instruction it aborts the process rather than raise."""
    try:
        import llvmlite.binding as llvm
        import numba
        if numba.config.CPU_FEATURES:
            named = {f[1:]: f[0] == "+" for f in numba.config.CPU_FEATURES.split(",") if f}
        elif numba.config.CPU_NAME not in (None, "", "host"):
            return None
        else:
            named = llvm.get_host_cpu_features()
    except Exception:  # noqa: BLE001 - no llvmlite, or a host it cannot read
        return None
    if all(named.get(f, False) for f in FEATURES):
        return "vnni"
    return "avx2" if named.get("avx2", False) else None


def padded_groups(k: int) -> int:
    """Groups a row of k inputs takes in the form: a whole number of UNROLL blocks."""
    per = BLOCK_GROUPS * UNROLL
    return -(-(k // GROUP) // per) * per


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in 0..15, scales and zeros float32 [N, K / GROUP] (quantize_int4's) ->
    the form (uint8 [N, blocks * BLOCK_BYTES])."""
    n, k = q.shape
    groups, padded = k // GROUP, padded_groups(k)
    blocks = padded // BLOCK_GROUPS
    qg = torch.zeros(n, padded, GROUP, dtype=torch.uint8)
    qg[:, :groups] = q.view(n, groups, GROUP)
    qb = qg.view(n, blocks, BLOCK_GROUPS, GROUP)
    nibbles = torch.cat((qb[:, :, 0] | (qb[:, :, 1] << 4), qb[:, :, 2] | (qb[:, :, 3] << 4)), -1)
    order = torch.tensor(SLOTS).argsort()  # slot s holds group order[s]

    def per_slot(t: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(n, padded)
        full[:, :groups] = t
        return full.view(n, blocks, BLOCK_GROUPS)[:, :, order].reshape(n, padded).to(
            torch.bfloat16).view(torch.uint8)

    return torch.cat((nibbles.reshape(n, -1), per_slot(scales), per_slot(zeros)), 1).contiguous()


def _intrinsics(isa: str) -> tuple[Any, Any]:
    """The numba intrinsics, written with `isa`'s instructions (_isa), for one weight row's dot
    product with one quantized activation row,
    each setting y[n] from the row starting at byte `at` of a flat form w:
    int4_row(w, at, xq, d, xs, blocks, y, n): xq int8, d and xs float32 (the activations, their
    scales and sums), in slots; int8_row(w, at, xq, dv, blocks, y, n, s, c): xq int8, dv float32
    (each group's scale, on the 8 lanes its 32 products land in), s the row's scale and c the
    offset C (module docstring)."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    bytes64, ints16 = ir.VectorType(i8, 64), ir.VectorType(i32, 16)
    floats16 = ir.VectorType(f32, 16)
    floats4, shorts4, ints4 = ir.VectorType(f32, 4), ir.VectorType(i16, 4), ir.VectorType(i32, 4)
    fast = ("fast",)

    Emit = emitter()
    const, lanes = Emit.i64, Emit.lanes

    def halves(e: Any, v: Any) -> tuple[Any, Any]:
        return (e.b.shuffle_vector(v, v, lanes(list(range(32)))),
                e.b.shuffle_vector(v, v, lanes(list(range(32, 64)))))

    def vpdpbusd(e: Any, unsigned: Any, signed: Any) -> Any:
        """64 bytes by 64, as 16 int32 lanes, each the sum of 4 products of an unsigned and a
        signed byte: vpdpbusd; on AVX2, per 32 bytes, vpmaddubsw (pairs, into int16: exact while
        a pair's sum stays within int16, as int4's nibbles by int8 do) then vpmaddwd by ones."""
        if isa == "vnni":
            none = ir.Constant(ints16, [0] * 16)
            return e.call("llvm.x86.avx512.vpdpbusd.512", ints16,
                          [none, e.b.bitcast(unsigned, ints16), e.b.bitcast(signed, ints16)])
        ones = ir.Constant(ir.VectorType(i16, 16), [1] * 16)
        parts = [e.call("llvm.x86.avx2.pmadd.wd", ir.VectorType(i32, 8), [e.call(
                     "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(i16, 16), [u, s]), ones])
                 for u, s in zip(halves(e, unsigned), halves(e, signed))]
        return e.b.shuffle_vector(parts[0], parts[1], lanes(list(range(16))))

    def signed_dot(e: Any, offset: Any, signed: Any) -> Any:
        """The int8 form's dot: vpdpbusd of q + 128 (its bytes as they are) by xq on VNNI, less
        the offset C after; on AVX2, where pairs of 255 * 127 overflow int16, q . xq itself as
        |xq| by q with xq's sign (psignb), as llama.cpp's AVX2 Q8_0 product."""
        if isa == "vnni":
            return vpdpbusd(e, offset, signed)
        q = e.b.xor(offset, ir.Constant(bytes64, [128] * 64))
        parts = []
        for w, x in zip(halves(e, q), halves(e, signed)):
            magnitude = e.call("llvm.abs.v32i8", ir.VectorType(i8, 32), [x, ir.Constant(
                ir.IntType(1), 0)])
            sign = e.call("llvm.x86.avx2.psign.b", ir.VectorType(i8, 32), [w, x])
            parts.append(e.call("llvm.x86.avx2.pmadd.wd", ir.VectorType(i32, 8), [e.call(
                "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(i16, 16), [magnitude, sign]),
                ir.Constant(ir.VectorType(i16, 16), [1] * 16)]))
        return e.b.shuffle_vector(parts[0], parts[1], lanes(list(range(16))))

    @intrinsic
    def int4_row(typingctx, w, at, xq, d, xs, blocks, y, n):  # noqa: ANN
        sig = types.void(w, at, xq, d, xs, blocks, y, n)

        def codegen(context, builder, signature, args):  # noqa: ANN
            w, at, xq, d, xs, blocks, y, n = args
            tw, _, txq, td, txs, _, ty, _ = signature.args
            e = Emit(context, builder)
            row = e.at(e.data(tw, w), at)
            scales = e.at(row, builder.mul(blocks, const(64)))
            zeros = e.at(row, builder.mul(blocks, const(72)))
            xp, dp, xsp = e.data(txq, xq), e.data(td, d), e.data(txs, xs)
            accs = e.accumulators(16, UNROLL)
            offsets = cgutils.alloca_once_value(builder, ir.Constant(floats4, [0.0] * 4))
            low, shift = ir.Constant(bytes64, [15] * 64), ir.Constant(bytes64, [4] * 64)

            def bf16(ptr: Any) -> Any:  # four bf16 -> <4 x float>: the high halves of floats
                wide = builder.zext(e.load(ptr, shorts4, 2), ints4)
                return builder.bitcast(builder.shl(wide, ir.Constant(ints4, [16] * 4)), floats4)

            def block(i: Any, u: int) -> None:
                at_w = builder.mul(i, const(64))
                e.prefetch(e.at(row, builder.add(at_w, const(PREFETCH))))
                nibbles = e.load(e.at(row, at_w), bytes64, 1)
                at_x = builder.mul(i, const(128))
                x_low = e.load(e.at(xp, at_x), bytes64, 1)
                x_high = e.load(e.at(xp, builder.add(at_x, const(64))), bytes64, 1)
                dot_low = vpdpbusd(e, builder.and_(nibbles, low), x_low)
                dot_high = vpdpbusd(e, builder.lshr(nibbles, shift), x_high)
                at_s, at_f = builder.mul(i, const(8)), builder.mul(i, const(4))
                s, z = bf16(e.at(scales, at_s)), bf16(e.at(zeros, at_s))
                sd = e.mul(s, e.load(e.at(dp, at_f, f32), floats4, 4))
                # the offset term: (z - 8 s) times the group's sum of activations
                m = builder.fsub(z, e.mul(s, ir.Constant(floats4, [8.0] * 4)), flags=fast)
                sums = e.load(e.at(xsp, at_f, f32), floats4, 4)
                builder.store(e.add(builder.load(offsets), e.mul(m, sums)), offsets)
                total = builder.load(accs[u])
                for dot, pick in ((dot_low, [0] * 8 + [1] * 8), (dot_high, [2] * 8 + [3] * 8)):
                    scale = builder.shuffle_vector(sd, sd, lanes(pick))
                    total = e.add(total, e.mul(builder.sitofp(dot, floats16), scale))
                builder.store(total, accs[u])

            e.blocks(blocks, UNROLL, block)
            builder.store(e.sum(accs, builder.load(offsets)), e.at(e.data(ty, y), n, f32))
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def int8_row(typingctx, w, at, xq, dv, blocks, y, n, s, c):  # noqa: ANN
        sig = types.void(w, at, xq, dv, blocks, y, n, s, c)

        def codegen(context, builder, signature, args):  # noqa: ANN
            w, at, xq, dv, blocks, y, n, s, c = args
            tw, _, txq, tdv, _, ty, _, _, _ = signature.args
            e = Emit(context, builder)
            row = e.at(e.data(tw, w), at)
            xp, dp = e.data(txq, xq), e.data(tdv, dv)
            accs = e.accumulators(16, UNROLL)

            def block(i: Any, u: int) -> None:
                at_w = builder.mul(i, const(64))
                e.prefetch(e.at(row, builder.add(at_w, const(PREFETCH))))
                dot = signed_dot(e, e.load(e.at(row, at_w), bytes64, 1),
                                 e.load(e.at(xp, at_w), bytes64, 1))
                scale = e.load(e.at(dp, builder.mul(i, const(16)), f32), floats16, 4)
                total = e.add(builder.load(accs[u]), e.mul(builder.sitofp(dot, floats16), scale))
                builder.store(total, accs[u])

            e.blocks(blocks, UNROLL, block)
            total = e.sum(accs)
            if isa == "vnni":  # AVX2's dot is q . xq already
                total = builder.fsub(total, c, flags=fast)
            one = e.mul(total, s)
            builder.store(one, e.at(e.data(ty, y), n, f32))
            return context.get_dummy_value()

        return sig, codegen

    return int4_row, int8_row


@cache
def _kernels(isa: str | None) -> dict[str, Callable[..., None]] | None:
    """The products of each form for few rows, written with `isa`'s instructions (one of
    `isas()`) and compiled now, or None where they cannot run here."""
    numba = numba_module()
    if numba is None or isa not in isas():
        return None

    def loop(fn: Callable[..., None]) -> Callable[..., None]:
        # numba's cache names its files after the function: one name per isa, so that one
        # isa's machine code is never loaded for the other's
        fn.__qualname__ = f"{fn.__qualname__}.{isa}"
        return numba.njit(parallel=True, fastmath=True, cache=True, nogil=True,
                          boundscheck=False)(fn)

    global _INT4_ROW, _INT8_ROW, _QUANTIZE
    # globals, not a closure's cells (numba's cache keys on those): numba reads them as it
    # compiles, so each isa's loops are compiled below, while the globals hold its intrinsics
    _INT4_ROW, _INT8_ROW = _intrinsics(isa)

    # unsigned indices: with signed ones numba's wraparound checks keep LLVM from vectorizing
    @numba.njit(inline="always", fastmath=True, boundscheck=False)
    def quantize(x, at, xq, to):
        """x[at..at+GROUP) -> xq[to..to+GROUP), int8 steps of d = max |x| / 127: (d, the sum of
        the x, the sum of the steps)."""
        top, total, steps = np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for j in range(GROUP):
            v = x[at + np.uint64(j)]
            total += v
            top = max(top, abs(v))
        inv = np.float32(127.0) / top if top > 0 else np.float32(0.0)
        for j in range(GROUP):
            q = np.rint(x[at + np.uint64(j)] * inv)
            xq[to + np.uint64(j)] = np.int8(q)
            steps += q
        return top / np.float32(127.0), total, steps

    _QUANTIZE = quantize
    slots = np.array(SLOTS, np.int64)

    @loop
    def product(x, w, scales, y):
        """x float32 [R, K] @ the form w [N, blocks * BLOCK_BYTES] -> y float32 [R, N]. (scales:
        unused, the form holds its own; every few-row loop takes (x, w, scales, y).)"""
        rows, k = x.shape
        n_rows, width = w.shape
        blocks = width // BLOCK_BYTES
        padded = blocks * BLOCK_GROUPS
        xq = np.zeros((rows, padded * GROUP), np.int8)
        d = np.zeros((rows, padded), np.float32)
        xs = np.zeros((rows, padded), np.float32)
        for r in range(rows):  # each group of x as int8 and a scale (and its sum), in slots
            for g in range(k // GROUP):
                slot = g - g % BLOCK_GROUPS + slots[g % BLOCK_GROUPS]
                d[r, slot], xs[r, slot], _ = _QUANTIZE(
                    x[r], np.uint64(g * GROUP), xq[r], np.uint64(slot * GROUP))
        flat = w.reshape(-1)
        for n in numba.prange(n_rows):
            for r in range(rows):
                _INT4_ROW(flat, np.int64(n * width), xq[r], d[r], xs[r], np.int64(blocks), y[r],
                        np.int64(n))

    @loop
    def int8_product(x, w, scales, y):
        """x float32 [R, K] @ the int8 form w [N, Kp] (scales float32 [N]) -> y float32 [R, N]."""
        rows, k = x.shape
        n_rows, width = w.shape
        xq = np.zeros((rows, width), np.int8)
        dv = np.zeros((rows, width // 4), np.float32)  # 8 lanes a group
        c = np.zeros(rows, np.float32)
        for r in range(rows):
            for g in range(k // GROUP):
                at = np.uint64(g * GROUP)
                d, _, steps = _QUANTIZE(x[r], at, xq[r], at)
                for j in range(8):
                    dv[r, g * 8 + j] = d
                c[r] += d * np.float32(128.0) * steps
        flat = w.reshape(-1)
        for n in numba.prange(n_rows):
            for r in range(rows):
                _INT8_ROW(flat, np.int64(n * width), xq[r], dv[r], np.int64(width // 64), y[r],
                          np.int64(n), scales[n], c[r])

    loops = {"int4": product, "int8": int8_product}
    _compile(loops)
    return {name: on_torch_threads(loop) for name, loop in loops.items()}


@cache
def _widening() -> dict[str, Callable[..., None]] | None:
    """The loops that widen each form to bf16 for a prompt's product (plain numba, the same
    whatever the CPU's instructions), or None where numba is not usable."""
    numba = numba_module()
    if numba is None:
        return None
    loop = numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False)
    slots = np.array(SLOTS, np.int64)

    @loop
    def widen(w, halves, first, k, out):
        """Rows first..first+R-1 of the form w (halves: the same bytes as uint16) as the bf16
        bits of their weights, out uint16 [R, k]: w = (q - 8) s + z rounded to nearest even."""
        width = w.shape[1]
        blocks = width // BLOCK_BYTES
        for r in numba.prange(out.shape[0]):
            n = first + r
            value = np.empty(1, np.float32)
            bits = value.view(np.uint32)
            for g in range(k // GROUP):
                b, i = g // BLOCK_GROUPS, g % BLOCK_GROUPS
                slot = b * BLOCK_GROUPS + slots[i]
                bits[0] = np.uint32(halves[n, blocks * 32 + slot]) << np.uint32(16)
                s = value[0]
                bits[0] = np.uint32(halves[n, blocks * 36 + slot]) << np.uint32(16)
                z = value[0] - np.float32(8.0) * s
                at, shift = b * 64 + (i // 2) * 32, (i % 2) * 4
                for j in range(GROUP):
                    value[0] = np.float32((w[n, at + j] >> shift) & 15) * s + z
                    u = bits[0]
                    out[r, g * GROUP + j] = np.uint16(
                        (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                        >> np.uint32(16))

    @loop
    def int8_widen(w, scales, first, out):
        """Rows first..first+R-1 of the int8 form as the bf16 bits of their weights, out uint16
        [R, k]: (q' - 128) s rounded to nearest even."""
        for r in numba.prange(out.shape[0]):
            n = first + r
            value = np.empty(1, np.float32)
            bits = value.view(np.uint32)
            for j in range(out.shape[1]):
                value[0] = np.float32(np.int32(w[n, j]) - 128) * scales[n]
                u = bits[0]
                out[r, j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16))
                                                              & np.uint32(1))) >> np.uint32(16))

    return {"int4": on_torch_threads(widen), "int8": on_torch_threads(int8_widen)}


def _compile(loops: dict[str, Callable[..., None]]) -> None:
    """The products called once on a small input, so that numba compiles them now, while the
    intrinsics' globals are this isa's."""
    x = np.zeros((1, GROUP), np.float32)
    int4 = pack(torch.zeros(1, GROUP, dtype=torch.uint8), torch.zeros(1, 1), torch.zeros(1, 1))
    int8, scales, _, _ = pack_int8(torch.zeros(1, GROUP, dtype=torch.int8), torch.zeros(1))
    loops["int4"](x, int4.numpy(), np.zeros(0, np.float32), np.zeros((1, 1), np.float32))
    loops["int8"](x, int8.numpy(), scales.numpy(), np.zeros((1, 1), np.float32))


# an Int4Linear's weights in the form: (the form, N, K)
State = tuple[torch.Tensor, int, int]


def _int4_linear(isa: str, x: torch.Tensor, state: State) -> torch.Tensor:
    """x [R, K] (any float dtype) @ W.T -> [R, N] in x's dtype, by isa's loop."""
    form, n, k = state
    xf = x.float().contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    _kernels(isa)["int4"](xf.numpy(), form.numpy(), NO_SCALES, y.numpy())
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def vnni_linear(x: torch.Tensor, state: State) -> torch.Tensor:
    return _int4_linear("vnni", x, state)


def avx2_linear(x: torch.Tensor, state: State) -> torch.Tensor:
    return _int4_linear("avx2", x, state)


def serves_vnni(n: int, k: int) -> bool:
    """A product's `fits`: whether the loops with vpdpbusd run here."""
    return "vnni" in isas() and _kernels("vnni") is not None


def serves_avx2(n: int, k: int) -> bool:
    """A product's `fits`: whether the loops with AVX2's instructions run here."""
    return "avx2" in isas() and _kernels("avx2") is not None


def widened_rows(state: State, first: int, rows: int) -> torch.Tensor:
    """Rows first..first+rows-1 of the weight as bf16 [rows, K]: a view of this thread's
    buffer, overwritten by its next call."""
    form, n, k = state
    out = scratch(rows * k).view(rows, k)
    halves = form.view(torch.int16).numpy().view(np.uint16)
    _widening()["int4"](form.numpy(), halves, first, k, out.numpy())
    return out.view(torch.bfloat16)


def widened_linear(x: torch.Tensor, state: State) -> torch.Tensor:
    """x [R, K] @ W.T for many rows (the int4 form)."""
    form, n, k = state
    return _chunked(x, n, k, lambda first, rows: widened_rows(state, first, rows))


def _chunked(x: torch.Tensor, n: int, width: int,
             widened: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """x [R, K] @ W.T for a weight of n rows of `width` (K or more: x is padded with zeros):
    `widened(first, rows)` gives rows of it in bf16 a chunk at a time, each chunk multiplied by
    oneDNN's bf16 GEMM (F.linear); y in x's dtype."""
    xb = torch.nn.functional.pad(x.to(torch.bfloat16), (0, width - x.shape[-1]))
    step = max(1, CHUNK_WEIGHTS // width)
    parts = [torch.nn.functional.linear(xb, widened(first, min(step, n - first)))
             for first in range(0, n, step)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    return y.to(x.dtype)


# ---- int8 ----
# an Int8Linear's weights in the int8 form: (the form, float32 scales [N], N, K)
Int8State = tuple[torch.Tensor, torch.Tensor, int, int]


def pack_int8(q: torch.Tensor, scales: torch.Tensor) -> Int8State:
    """q int8 [N, K] and its scales [N] (quantize_int8's) -> the int8 form."""
    n, k = q.shape
    per = 64 * UNROLL
    form = torch.full((n, -(-k // per) * per), 128, dtype=torch.uint8)  # zero weights
    form[:, :k] = (q.to(torch.int16) + 128).to(torch.uint8)
    return form, scales.detach().float().contiguous(), n, k


def _int8_linear(isa: str, x: torch.Tensor, state: Int8State) -> torch.Tensor:
    """x [R, K] (any float dtype) @ W.T -> [R, N] in x's dtype, by isa's loop."""
    form, scales, n, k = state
    xf = x.float().contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    _kernels(isa)["int8"](xf.numpy(), form.numpy(), scales.numpy(), y.numpy())
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def int8_linear(x: torch.Tensor, state: Int8State) -> torch.Tensor:
    return _int8_linear("vnni", x, state)


def int8_avx2_linear(x: torch.Tensor, state: Int8State) -> torch.Tensor:
    return _int8_linear("avx2", x, state)


def int8_widened_rows(state: Int8State, first: int, rows: int) -> torch.Tensor:
    """Rows first..first+rows-1 of the weight as bf16 [rows, K padded]: a view of this thread's
    buffer, overwritten by its next call."""
    form, scales, n, k = state
    width = form.shape[1]
    out = scratch(rows * width).view(rows, width)
    _widening()["int8"](form.numpy(), scales.numpy(), first, out.numpy())
    return out.view(torch.bfloat16)


def int8_widened_linear(x: torch.Tensor, state: Int8State) -> torch.Tensor:
    """x [R, K] @ W.T for many rows (the int8 form, its rows padded)."""
    form, scales, n, k = state
    return _chunked(x, n, form.shape[1], lambda first, rows: int8_widened_rows(state, first, rows))
