"""int4 weights multiplied by a decode step's few rows with the CPU's 8-bit dot product
(AVX-512 VNNI's vpdpbusd), as llama.cpp's Q4_0 x Q8_0 product does: each row of activations is
quantized to int8 in groups of 32, and 64 weights at a time are multiplied by them in integers.

ATen's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`) dequantizes every weight to floating point
in registers, and reads a decode step's weights at well under the memory's pace. This module
holds the weights in its own row-major form (`pack`), written for the loop: each row is one
stream of bytes (its nibbles, then its groups' scales and zeros in bf16) that the loop reads
front to back, prefetching PREFETCH bytes ahead. numba compiles the loop with LLVM for the CPU in
use (no C++ compiler); the dot product is LLVM's x86 intrinsic, so the loop is offered only where
the CPU has it (`usable`). A prompt's many rows widen the same form to bf16 a chunk of rows at a
time for oneDNN's GEMM, as int4_gemm.py does for int4pack's.

For an Int4Linear's group g of a row, w = (q - 8) * s + z (quantize.quantize_int4); for
activations x = d * xq in that group (xq int8, d = max |x| / 127), the row's product is
sum_g s d (q . xq) + sum_g (z - 8 s) (sum of the group's x): an integer dot of unsigned nibbles by
signed bytes, vpdpbusd's operands. Rounding the activations to int8 costs about 1% of the
largest output (llama.cpp's Q8_0 activations do the same); linear.py checks the product against
the dequantized weights' float32 one, to int4's tolerance, before it is used.

The form, per row: groups are taken four at a time (a block, 64 bytes), padded with zero groups to
a whole number of UNROLL blocks. Byte j of a block's first 32 holds group 0's weight j in its low
nibble and group 1's in its high one; bytes 32..63 likewise groups 2 and 3. So a block's low
nibbles are groups 0 and 2 in order and its high ones groups 1 and 3: the activations, their
scales and sums are laid out in that order (SLOTS), and the scales and zeros too. After the
row's blocks come its scales, then its zeros, bf16, four a block."""

from __future__ import annotations

import threading
from functools import cache
from typing import Any, Callable

import numpy as np
import torch

from .jit import numba_module, on_torch_threads

GROUP = 32  # weights (and activations) that share a scale: quantize.GROUP
BLOCK_GROUPS = 4  # groups a block holds (64 bytes of nibbles)
UNROLL = 2  # blocks a loop iteration takes, each into its own accumulator
PREFETCH = 4096  # bytes ahead of the block being read that the loop asks the memory for
BLOCK_BYTES = 64 + 2 * 2 * BLOCK_GROUPS  # a block's nibbles, and its four bf16 scales and zeros
SLOTS = (0, 2, 1, 3)  # where a block's group i goes in the order the loop reads them
FEATURES = ("avx512f", "avx512bw", "avx512vnni")  # what the loop's instructions need
CHUNK_WEIGHTS = 1 << 21  # weights widened at once for many rows (4 MiB of bf16)

_buffers = threading.local()
_ROW_DOT: Any = None  # the loop's intrinsic (_row_dot), made with the loops


def usable() -> bool:
    """Whether the loop can run here: an x86 CPU with AVX-512 VNNI, and numba."""
    return _kernels() is not None


@cache
def _host_has_features() -> bool:
    try:
        import llvmlite.binding as llvm
        features = llvm.get_host_cpu_features()
    except Exception:  # noqa: BLE001 - no llvmlite, or a host it cannot read
        return False
    return all(features.get(f, False) for f in FEATURES)


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


def _row_dot() -> Any:
    """The numba intrinsic for one weight row's dot product with one quantized activation row:
    row_dot(w, at, xq, d, xs, blocks, y, n) sets y[n] from the row starting at byte `at` of the
    flat form w; xq int8, d and xs float32: the activations, their scales and sums, in slots."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    i8, i16, i32, i64, f32 = (ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64),
                              ir.FloatType())
    bytes64, ints16 = ir.VectorType(i8, 64), ir.VectorType(i32, 16)
    floats16 = ir.VectorType(f32, 16)
    floats4, shorts4, ints4 = ir.VectorType(f32, 4), ir.VectorType(i16, 4), ir.VectorType(i32, 4)
    fast = ("fast",)

    def const(n: int) -> Any:
        return ir.Constant(i64, n)

    def lanes(values: list[int]) -> Any:
        return ir.Constant(ir.VectorType(i32, len(values)), values)

    @intrinsic
    def row_dot(typingctx, w, at, xq, d, xs, blocks, y, n):  # noqa: ANN
        sig = types.void(w, at, xq, d, xs, blocks, y, n)

        def codegen(context, builder, signature, args):  # noqa: ANN
            w, at, xq, d, xs, blocks, y, n = args
            tw, _, txq, td, txs, _, ty, _ = signature.args

            def data(ty_: Any, value: Any) -> Any:
                return context.make_array(ty_)(context, builder, value).data

            def at_byte(base: Any, offset: Any, ty_: Any = i8) -> Any:
                return builder.gep(base, [offset], source_etype=ty_)

            def load(ptr: Any, ty_: Any, align: int) -> Any:
                return builder.load(ptr, typ=ty_, align=align)

            module = builder.module
            vpdpbusd = cgutils.get_or_insert_function(
                module, ir.FunctionType(ints16, [ints16] * 3), "llvm.x86.avx512.vpdpbusd.512")
            prefetch = cgutils.get_or_insert_function(
                module, ir.FunctionType(ir.VoidType(), [ir.PointerType(), i32, i32, i32]),
                "llvm.prefetch.p0")
            row = at_byte(data(tw, w), at)
            scales = at_byte(row, builder.mul(blocks, const(64)))
            zeros = at_byte(row, builder.mul(blocks, const(72)))
            xp, dp, xsp = data(txq, xq), data(td, d), data(txs, xs)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(floats16, [0.0] * 16))
                    for _ in range(UNROLL)]
            offsets = cgutils.alloca_once_value(builder, ir.Constant(floats4, [0.0] * 4))
            none = ir.Constant(ints16, [0] * 16)
            low, shift = ir.Constant(bytes64, [15] * 64), ir.Constant(bytes64, [4] * 64)

            def bf16(ptr: Any) -> Any:  # four bf16 -> <4 x float>: the high halves of floats
                wide = builder.zext(load(ptr, shorts4, 2), ints4)
                return builder.bitcast(builder.shl(wide, ir.Constant(ints4, [16] * 4)), floats4)

            def block(i: Any, acc: Any) -> None:
                at_w = builder.mul(i, const(64))
                builder.call(prefetch, [at_byte(row, builder.add(at_w, const(PREFETCH))),
                                        ir.Constant(i32, 0), ir.Constant(i32, 3),
                                        ir.Constant(i32, 1)])
                nibbles = load(at_byte(row, at_w), bytes64, 1)
                at_x = builder.mul(i, const(128))
                x_low = load(at_byte(xp, at_x), bytes64, 1)
                x_high = load(at_byte(xp, builder.add(at_x, const(64))), bytes64, 1)
                dot_low = builder.call(vpdpbusd, [none, builder.bitcast(
                    builder.and_(nibbles, low), ints16), builder.bitcast(x_low, ints16)])
                dot_high = builder.call(vpdpbusd, [none, builder.bitcast(
                    builder.lshr(nibbles, shift), ints16), builder.bitcast(x_high, ints16)])
                at_s, at_f = builder.mul(i, const(8)), builder.mul(i, const(4))
                s, z = bf16(at_byte(scales, at_s)), bf16(at_byte(zeros, at_s))
                sd = builder.fmul(s, load(at_byte(dp, at_f, f32), floats4, 4), flags=fast)
                # the offset term: (z - 8 s) times the group's sum of activations
                m = builder.fsub(z, builder.fmul(s, ir.Constant(floats4, [8.0] * 4), flags=fast),
                                 flags=fast)
                sums = load(at_byte(xsp, at_f, f32), floats4, 4)
                builder.store(builder.fadd(builder.load(offsets), builder.fmul(m, sums, flags=fast),
                                           flags=fast), offsets)
                total = builder.load(acc)
                for dot, pick in ((dot_low, [0] * 8 + [1] * 8), (dot_high, [2] * 8 + [3] * 8)):
                    scale = builder.shuffle_vector(sd, sd, lanes(pick))
                    total = builder.fadd(total, builder.fmul(builder.sitofp(dot, floats16), scale,
                                                             flags=fast), flags=fast)
                builder.store(total, acc)

            with cgutils.for_range(builder, builder.udiv(blocks, const(UNROLL))) as loop:
                for u in range(UNROLL):
                    block(builder.add(builder.mul(loop.index, const(UNROLL)), const(u)), accs[u])
            total = builder.load(accs[0])
            for acc in accs[1:]:
                total = builder.fadd(total, builder.load(acc), flags=fast)
            def halves(v: Any, width: int) -> Any:  # v's first `width` lanes plus the next
                first = builder.shuffle_vector(v, v, lanes(list(range(width))))
                second = builder.shuffle_vector(v, v, lanes(list(range(width, 2 * width))))
                return builder.fadd(first, second, flags=fast)

            for width in (8, 4):  # a tree, not a chain of 16 dependent additions
                total = halves(total, width)
            total = builder.fadd(total, builder.load(offsets), flags=fast)
            total = halves(total, 2)
            one = builder.fadd(builder.extract_element(total, ir.Constant(i32, 0)),
                               builder.extract_element(total, ir.Constant(i32, 1)), flags=fast)
            builder.store(one, at_byte(data(ty, y), n, f32))
            return context.get_dummy_value()

        return sig, codegen

    return row_dot


@cache
def _kernels() -> tuple[Callable[..., None], Callable[..., None]] | None:
    """The compiled product and widening loops, or None where they cannot run here."""
    numba = numba_module()
    if numba is None or not _host_has_features():
        return None
    global _ROW_DOT
    _ROW_DOT = _row_dot()  # a global, not a closure's cell: numba's cache keys on those
    slots = np.array(SLOTS, np.int64)

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False)
    def product(x, w, y):
        """x float32 [R, K] @ the form w [N, blocks * BLOCK_BYTES] -> y float32 [R, N]."""
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
                top, total = np.float32(0.0), np.float32(0.0)
                for j in range(GROUP):
                    v = x[r, g * GROUP + j]
                    total += v
                    top = max(top, abs(v))
                inv = np.float32(127.0) / top if top > 0 else np.float32(0.0)
                for j in range(GROUP):
                    xq[r, slot * GROUP + j] = np.int8(np.round(x[r, g * GROUP + j] * inv))
                d[r, slot] = top / np.float32(127.0)
                xs[r, slot] = total
        flat = w.reshape(-1)
        for n in numba.prange(n_rows):
            for r in range(rows):
                _ROW_DOT(flat, np.int64(n * width), xq[r], d[r], xs[r], np.int64(blocks), y[r],
                        np.int64(n))

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False)
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

    return on_torch_threads(product), on_torch_threads(widen)


# an Int4Linear's weights in the form: (the form, N, K)
State = tuple[torch.Tensor, int, int]


def vnni_linear(x: torch.Tensor, state: State) -> torch.Tensor:
    """x [R, K] (any float dtype) @ W.T -> [R, N] in x's dtype, by the VNNI loop."""
    form, n, k = state
    xf = x.float().contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    _kernels()[0](xf.numpy(), form.numpy(), y.numpy())
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def widened_rows(state: State, first: int, rows: int) -> torch.Tensor:
    """Rows first..first+rows-1 of the weight as bf16 [rows, K]: a view of this thread's
    buffer, overwritten by its next call."""
    form, n, k = state
    need = rows * k
    buffer = getattr(_buffers, "widened", None)
    if buffer is None or buffer.numel() < need:
        buffer = _buffers.widened = torch.empty(max(need, CHUNK_WEIGHTS), dtype=torch.uint16)
    out = buffer[:need].view(rows, k)
    _kernels()[1](form.numpy(), form.view(torch.int16).numpy().view(np.uint16), first, k,
                  out.numpy())
    return out.view(torch.bfloat16)


def widened_linear(x: torch.Tensor, state: State) -> torch.Tensor:
    """x [R, K] @ W.T for many rows: the weight widened to bf16 a chunk of rows at a time, each
    chunk multiplied by oneDNN's bf16 GEMM (F.linear); y in x's dtype."""
    form, n, k = state
    xb = x.to(torch.bfloat16)
    step = max(1, CHUNK_WEIGHTS // k)
    parts = [torch.nn.functional.linear(xb, widened_rows(state, first, min(step, n - first)))
             for first in range(0, n, step)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    return y.to(x.dtype)
