"""A product of a few activation rows by a float32 weight, compiled by numba, that spreads the
weight's rows over the cores.

On the CPU, torch's float32 products of one row (decode) stream a weight at about one core's
pace: ATen's and MKL's split the work by activation rows, of which decode has one, and the split
product (linear.split_linear) pays for a batched product's bookkeeping. This loop splits it by
weight rows over numba's threads. numba compiles it with LLVM for the CPU in use at its first
call (no C++ compiler) and keeps the machine code in its on-disk cache. It is a candidate like
any other: linear.py times it against torch's products and checks it against F.linear first;
where numba is missing, it is none.

Why float32 only: loops of the same kind for bfloat16 and int8 weights, as fast as fbgemm's
products when timed alone, made a decode step slower (README, "CPU kernels chosen by
measurement"), which timing a product alone cannot see; where the products are most of a step
(float32 weights) the faster product wins by far more. Why they were slower is not known: it is
not a second thread pool, as once thought, since numba's parallel loops run on torch's own
OpenMP threads (jit.py)."""

from __future__ import annotations

from functools import cache
from typing import Callable

import numpy as np
import torch

from .jit import numba_module, on_torch_threads


@cache
def _kernel() -> Callable[..., None] | None:
    """The compiled loop (numba compiles it at its first call, or loads it from its cache), or
    None where numba is not usable (jit.numba_module)."""
    numba = numba_module()
    if numba is None:
        return None

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def gemv(w, x, y):  # w float32 [N, K], x float32 [R, K] -> y float32 [R, N]
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
    _kernel()(weight.detach().numpy(), x.detach().contiguous().numpy(), y.numpy())
    return y
