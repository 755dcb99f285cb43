"""Products of a few activation rows by a float32 or a bfloat16 weight, compiled by numba, that
spread the weight's rows over the cores.

On the CPU, torch's float32 products of one row (decode) stream a weight at about one core's
pace: ATen's and MKL's split the work by activation rows, of which decode has one, and the split
product (linear.split_linear) pays for a batched product's bookkeeping. This loop splits it by
weight rows over numba's threads. numba compiles it with LLVM for the CPU in use at its first
call (no C++ compiler) and keeps the machine code in its on-disk cache.

The bfloat16 loop is written in LLVM's IR (jit.emitter): each weight row read 64 bytes at a
time, widened to float32 in registers (a bf16 is a float32's high half), multiplied by the
float32 activations into two accumulators, asking the memory for the bytes PREFETCH ahead. Its
products are F.linear's in float32 over the bf16 weights: the activations are not rounded. An
earlier bfloat16 loop in plain numba, as fast as fbgemm's product alone, made a decode step
slower; this one makes the step faster than oneDNN's and fbgemm's products do (README, "The
products' pace").

Both loops are candidates like any other: linear.py times them against torch's products and
checks them against F.linear first; where numba is missing, they are none."""

from __future__ import annotations

from functools import cache
from typing import Callable

import numpy as np
import torch

from .jit import NO_SCALES, emitter, numba_module, on_torch_threads

PREFETCH = 4096  # bytes ahead of the block being read that the bf16 loop asks the memory for
UNROLL = 2  # blocks of 32 bf16 weights a loop iteration takes, each into its own accumulator
BLOCK = 32  # bf16 weights a block (64 bytes, one vector load)
_BF16_ROW = None  # the bf16 loop's intrinsic (_bf16_row), a global: numba's cache keys on cells


@cache
def _kernel() -> Callable[..., None] | None:
    """The compiled loop (numba compiles it at its first call, or loads it from its cache), or
    None where numba is not usable (jit.numba_module)."""
    numba = numba_module()
    if numba is None:
        return None

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def gemv(x, w, scales, y):  # x float32 [R, K] @ w float32 [N, K] -> y float32 [R, N]
        for n in numba.prange(w.shape[0]):
            for r in range(x.shape[0]):
                acc = np.float32(0.0)
                for k in range(w.shape[1]):
                    acc += w[n, k] * x[r, k]
                y[r, n] = acc

    return on_torch_threads(gemv)


def fits(n: int, k: int) -> bool:
    """Whether the loop exists here (numba imports)."""
    return _kernel() is not None


def float32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, K] @ weight.T for float32 x and weight [N, K]."""
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    _kernel()(x.detach().contiguous().numpy(), weight.detach().numpy(), NO_SCALES, y.numpy())
    return y


def _bf16_row():  # noqa: ANN202 - a numba intrinsic
    """bf16_row(w, at, x, blocks, y, n) sets y[n] to the dot product of the bf16 row starting at
    element `at` of the flat weight w (uint16: the bits) with the float32 row x, `blocks` blocks
    of BLOCK (a multiple of UNROLL)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    i16, i32, f32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
    shorts, ints, floats = (ir.VectorType(t, BLOCK) for t in (i16, i32, f32))
    Emit = emitter()

    @intrinsic
    def bf16_row(typingctx, w, at, x, blocks, y, n):  # noqa: ANN
        sig = types.void(w, at, x, blocks, y, n)

        def codegen(context, builder, signature, args):  # noqa: ANN
            w, at, x, blocks, y, n = args
            tw, _, tx, _, ty, _ = signature.args
            e = Emit(context, builder)
            row, xp = e.at(e.data(tw, w), at, i16), e.data(tx, x)
            accs = e.accumulators(BLOCK, UNROLL)
            high = ir.Constant(ints, [16] * BLOCK)

            def block(i, u):  # noqa: ANN
                at_i = builder.mul(i, e.i64(BLOCK))
                e.prefetch(e.at(row, builder.add(at_i, e.i64(PREFETCH // 2)), i16))
                bits = builder.zext(e.load(e.at(row, at_i, i16), shorts, 2), ints)
                weights = builder.bitcast(builder.shl(bits, high), floats)
                xs = e.load(e.at(xp, at_i, f32), floats, 4)
                builder.store(e.add(builder.load(accs[u]), e.mul(weights, xs)), accs[u])

            e.blocks(blocks, UNROLL, block)
            builder.store(e.sum(accs), e.at(e.data(ty, y), n, f32))
            return context.get_dummy_value()

        return sig, codegen

    return bf16_row


@cache
def _bf16_kernel() -> Callable[..., None] | None:
    numba = numba_module()
    if numba is None:
        return None
    global _BF16_ROW
    _BF16_ROW = _bf16_row()

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False)
    def gemv(x, w, scales, y):  # x float32 [R, K] @ w uint16 [N, K] (bf16 bits) -> y [R, N]
        n_rows, k = w.shape
        flat = w.reshape(-1)
        for n in numba.prange(n_rows):
            for r in range(x.shape[0]):
                _BF16_ROW(flat, np.int64(n * k), x[r], np.int64(k // BLOCK), y[r], np.int64(n))

    return on_torch_threads(gemv)


def bfloat16_fits(n: int, k: int) -> bool:
    """Whether the bf16 loop serves an N x K weight here: numba usable, rows of whole blocks."""
    return k % (BLOCK * UNROLL) == 0 and _bf16_kernel() is not None


def bfloat16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, K] (any float dtype) @ weight.T for a bf16 weight [N, K] (contiguous), computed in
    float32; y in x's dtype."""
    w = weight.detach()
    w = w if w.is_contiguous() else w.contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    _bf16_kernel()(x.detach().float().contiguous().numpy(),
                   w.view(torch.int16).numpy().view(np.uint16), NO_SCALES, y.numpy())
    return y if x.dtype == torch.float32 else y.to(x.dtype)
