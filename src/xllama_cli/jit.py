"""numba, the compiler of the CPU loops (gemv.py, cpu_attention.py): imported once, its parallel
loops on torch's own OpenMP threads, each loop run with as many threads as torch uses.

numba compiles a loop with LLVM for the CPU in use at its first call (no C++ compiler) and keeps
the machine code in its on-disk cache. With torch loaded first, numba's OpenMP layer binds
GOMP_parallel and omp_set_num_threads to torch's libgomp (LD_DEBUG=bindings): the process has no
more threads after numba's first parallel call. That shared runtime is also why starting numba's
threads changes torch's thread count, which `numba_module` puts back."""

from __future__ import annotations

import os
from functools import cache
from typing import Any, Callable

import torch


@cache
def numba_module() -> Any | None:
    """numba with its threads started, or None where it cannot be imported or its threads are not
    OpenMP's. (numba prefers TBB where it is installed and falls back to its own workqueue where no
    OpenMP runtime is: a workqueue made decode slower beside torch's threads even where a loop
    alone was faster, and TBB is unmeasured. A layer the user chose with NUMBA_THREADING_LAYER is
    kept, and only used if it is OpenMP.)"""
    try:
        import numba
        import numpy as np
    except Exception:  # noqa: BLE001 - a missing or broken numba: no numba loops
        return None
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "omp"

    @numba.njit(parallel=True, cache=True)
    def start(a):
        for i in numba.prange(a.shape[0]):
            a[i] = i

    threads = torch.get_num_threads()
    try:  # the first parallel call starts numba's threads
        start(np.zeros(2, np.float32))
        if numba.threading_layer() != "omp":
            return None
    except Exception:  # noqa: BLE001 - no OpenMP runtime for numba here: no numba loops
        return None
    finally:
        # starting numba's threads sets torch's count too (to NUMBA_NUM_THREADS, every logical
        # CPU): the count torch had (OMP_NUM_THREADS, torch.set_num_threads or its default of
        # one per core) is put back, for torch's ops and for the keys of the kernel cache
        torch.set_num_threads(threads)
    return numba


def on_torch_threads(loop: Callable[..., Any]) -> Callable[..., Any]:
    """`loop` (a numba function) run with as many threads as torch's: the count the choice of it
    was measured for."""
    numba = numba_module()

    def run(*args: Any) -> Any:
        threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
        return loop(*args)

    return run
