"""numba, the compiler of the CPU loops (gemv.py, cpu_attention.py, int4_gemm.py, vnni.py):
imported once, its parallel loops on torch's own OpenMP threads, each loop run with as many
threads as torch uses; and `emitter`, for the loops written in LLVM's IR (numba intrinsics).

numba compiles a loop with LLVM for the CPU in use at its first call (no C++ compiler) and keeps
the machine code in its on-disk cache. With torch loaded first, numba's OpenMP layer binds
GOMP_parallel and omp_set_num_threads to torch's libgomp (LD_DEBUG=bindings): the process has no
more threads after numba's first parallel call. That shared runtime is also why starting numba's
threads changes torch's thread count, which `numba_module` puts back."""

from __future__ import annotations

import os
from functools import cache
from typing import Any, Callable

import numpy as np
import torch

# Every few-row product loop takes (x, w, scales, y): x float32 [R, K] @ a weight w of its own
# form (with scales [N] where the form keeps them apart) -> y float32 [R, N]; one signature, so
# that numba code can call any of them (cpu_block.py). A loop whose form holds its own scales,
# or has none, takes these.
NO_SCALES = np.zeros(0, np.float32)


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

    run.loop = loop  # for numba code that calls it (cpu_block.py)
    return run


@cache
def emitter() -> type:
    """The helper with which a numba intrinsic writes a loop over a weight row in LLVM's IR (as
    gemv.py's bf16 loop and vnni.py's do): where a numba loop would leave the vectorizing, the
    unrolling and the prefetching to LLVM's judgement, the IR says them. Built at first use
    (numba and llvmlite imported then)."""
    import llvmlite.binding as llvm
    from llvmlite import ir
    from numba.core import cgutils

    i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
    fast = ("fast",)
    # the intrinsic's name mangles its pointer type: opaque since LLVM 17 (llvmlite 0.45)
    PREFETCH = "llvm.prefetch.p0" if llvm.llvm_version_info >= (17,) else "llvm.prefetch.p0i8"

    class Emit:
        """IR for one intrinsic's builder: pointers into arrays, loads, prefetches, unrolled
        blocks with an accumulator each, and their sum."""

        def __init__(self, context: Any, builder: Any) -> None:
            self.context, self.b = context, builder

        @staticmethod
        def i64(n: int) -> Any:
            return ir.Constant(i64, n)

        @staticmethod
        def lanes(values: list[int]) -> Any:
            """A shuffle's mask."""
            return ir.Constant(ir.VectorType(i32, len(values)), values)

        def call(self, name: str, result: Any, args: list[Any]) -> Any:
            """LLVM's intrinsic `name` (which returns `result`) on args."""
            fn = cgutils.get_or_insert_function(
                self.b.module, ir.FunctionType(result, [a.type for a in args]), name)
            return self.b.call(fn, args)

        def data(self, ty: Any, value: Any) -> Any:
            """The data pointer of a numba array argument of type ty."""
            return self.context.make_array(ty)(self.context, self.b, value).data

        def at(self, base: Any, offset: Any, ty: Any = i8) -> Any:
            """base + offset elements of ty."""
            return self.b.gep(base, [offset], source_etype=ty)

        def load(self, ptr: Any, ty: Any, align: int) -> Any:
            """A ty (a vector) from ptr, an element pointer: cast first for LLVM's typed
            pointers (numba before 0.62), a no-op under its opaque ones."""
            return self.b.load(self.b.bitcast(ptr, ir.PointerType(ty)), typ=ty, align=align)

        def prefetch(self, ptr: Any) -> None:
            """Ask for the line at ptr, for reading, into every cache level."""
            byte = self.b.bitcast(ptr, ir.PointerType(i8))
            self.call(PREFETCH, ir.VoidType(),
                      [byte, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])

        def accumulators(self, lanes: int, count: int) -> list[Any]:
            """`count` float32 vectors of `lanes` lanes, zero."""
            zero = ir.Constant(ir.VectorType(f32, lanes), [0.0] * lanes)
            return [cgutils.alloca_once_value(self.b, zero) for _ in range(count)]

        def blocks(self, count: Any, unroll: int, block: Callable[[Any, int], None]) -> None:
            """block(i, u) for i in 0..count-1 (a multiple of unroll), unroll at a time (u: which
            of them)."""
            with cgutils.for_range(self.b, self.b.udiv(count, self.i64(unroll))) as loop:
                for u in range(unroll):
                    block(self.b.add(self.b.mul(loop.index, self.i64(unroll)), self.i64(u)), u)

        def add(self, a: Any, b: Any) -> Any:
            return self.b.fadd(a, b, flags=fast)

        def mul(self, a: Any, b: Any) -> Any:
            return self.b.fmul(a, b, flags=fast)

        def sum(self, accs: list[Any], extra: Any = None) -> Any:
            """The accumulators' lanes summed as a tree (not a chain of dependent additions),
            with `extra`'s 4 lanes if given."""
            total = self.b.load(accs[0])
            for acc in accs[1:]:
                total = self.add(total, self.b.load(acc))
            width = total.type.count // 2
            while width:
                if width == 2 and extra is not None:
                    total = self.add(total, extra)
                first = self.b.shuffle_vector(total, total, self.lanes(list(range(width))))
                second = self.b.shuffle_vector(total, total,
                                               self.lanes(list(range(width, 2 * width))))
                total, width = self.add(first, second), width // 2
            return self.b.extract_element(total, ir.Constant(i32, 0))

    return Emit
