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
not a second thread pool, as once thought, since numba's parallel regions run on torch's own
OpenMP threads (with torch loaded first, numba's omppool binds GOMP_parallel and
omp_set_num_threads to torch's libgomp: LD_DEBUG=bindings; the process has no more threads after
numba's first call). That shared runtime is also why starting numba's threads changes torch's
thread count, which _kernel puts back."""

from __future__ import annotations

import os
from functools import cache
from typing import Any, Callable

import torch


@cache
def _kernel() -> Callable[..., None] | None:
    """The compiled loop (numba compiles it at its first call, or loads it from its cache), or
    None where numba cannot be imported or its threads are not OpenMP's. (numba prefers TBB
    where it is installed and falls back to its own workqueue where no OpenMP runtime is: a
    workqueue made decode slower beside torch's threads even where the loop alone was faster,
    and TBB is unmeasured. A layer the user chose with NUMBA_THREADING_LAYER is kept, and only
    used if it is OpenMP.)"""
    try:
        import numba
        import numpy as np
    except Exception:  # noqa: BLE001 - a missing or broken numba: no candidate
        return None
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "omp"

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def gemv(w, x, y):  # w float32 [N, K], x float32 [R, K] -> y float32 [R, N]
        for n in numba.prange(w.shape[0]):
            for r in range(x.shape[0]):
                acc = np.float32(0.0)
                for k in range(w.shape[1]):
                    acc += w[n, k] * x[r, k]
                y[r, n] = acc

    threads = torch.get_num_threads()
    try:  # the first call compiles, and starts numba's threads
        one = np.ones((1, 1), np.float32)
        gemv(one, one, one.copy())
        if numba.threading_layer() != "omp":
            return None
    except Exception:  # noqa: BLE001 - no OpenMP runtime for numba here: no candidate
        return None
    finally:
        # starting numba's threads sets torch's count too (to NUMBA_NUM_THREADS, every logical
        # CPU): the count torch had (OMP_NUM_THREADS, torch.set_num_threads or its default of
        # one per core) is put back, for torch's ops and for the keys of the kernel cache
        torch.set_num_threads(threads)

    def run(w: Any, x: Any, y: Any) -> None:
        # as many threads as torch's: the count the choice was measured for
        threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
        gemv(w, x, y)

    return run


def fits(n: int, k: int) -> bool:
    """Whether the loop exists here (numba imports)."""
    return _kernel() is not None


def float32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, K] @ weight.T for float32 x and weight [N, K]."""
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    _kernel()(weight.detach().numpy(), x.detach().contiguous().numpy(), y.numpy())
    return y
