"""CPU kernels for a built model's linear layers: the weight-streaming product of decode at full
memory bandwidth, and oneDNN's packed weights. `use_cpu_kernels` swaps them in, the way
quantize.py swaps in int8 layers; the model itself is built from plain nn.Linear.

Decoding a token multiplies a few rows (one per sequence) by every weight matrix, so its speed is
the speed at which the weights stream from memory. ATen's CPU path for that product (a GEMV, or a
GEMM with a handful of rows) runs on one thread and reads well below what the memory delivers;
the same product as a batched multiply over the weight split by rows runs one part per thread.

Faster still on the CPU, for every row count, is oneDNN's product over a weight reordered once into
its blocked layout (`pack`): the weight streams in the order oneDNN's kernel reads it, spread over
the threads, and bfloat16 uses the CPU's own bf16 dot-product instructions where it has them. A
packed weight is opaque (no strides, no gradient): inference only.

oneDNN's ops are private to torch (`torch.ops.mkldnn.*`): each is tried once per process on a
small product and checked against F.linear (`probed`); where one is missing or wrong, F.linear
serves instead.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows (batch x new tokens) a product is bound by reading the weights; above it
# (prefill) it is bound by arithmetic, where ATen's GEMM is already the fast path.
SMALL_ROWS = 16

_PROBES: dict[str, bool] = {}


def probed(name: str, check: Callable[[], bool]) -> bool:
    """Whether the private op `name` works here: `check()` (which compares it with F.linear) runs
    once per process and its answer is kept. A missing op, or one that raises, does not work."""
    if name not in _PROBES:
        try:
            with torch.no_grad():
                _PROBES[name] = bool(check())
        except Exception:  # noqa: BLE001 - any failure of a private op means: do not use it
            _PROBES[name] = False
    return _PROBES[name]


def agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    """A probe's verdict: `got` has want's shape and values, to the rounding of got's dtype."""
    tol = 1e-4 if got.dtype == torch.float32 else 2e-2
    return got.shape == want.shape and torch.allclose(got.float(), want, rtol=tol,
                                                      atol=tol * want.abs().max().item())


def onednn_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed and dense products (`pack`, `onednn_linear`) give F.linear's results
    in `dtype` here; for bfloat16, also whether the CPU computes it natively (AVX-512 BF16 or AMX:
    elsewhere oneDNN emulates it, slower than ATen)."""
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


def is_small(x: torch.Tensor) -> bool:
    """Whether x [..., K] has few enough rows for the weight-streaming paths (CPU only)."""
    return x.device.type == "cpu" and x.numel() <= SMALL_ROWS * x.shape[-1]


def packable(weight: torch.Tensor, decode_batch: int | None = None) -> bool:
    """Whether a packed weight (`pack`) is the faster one for this CPU, dtype and decode batch.

    bfloat16: where oneDNN computes it natively. float32: unless the model decodes one sequence at
    a time (decode_batch 1), where the split product (`matmul`) streams faster than oneDNN's;
    prefill and several rows are faster packed (decode_batch None: no decoding, e.g. perplexity)."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return False
    if weight.dtype == torch.float32 and decode_batch == 1:
        return False
    return onednn_works(weight.dtype)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] in oneDNN's blocked layout (an opaque tensor; `.to_dense()` gives it back)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight.T by oneDNN's kernel, for a packed (`pack`) or a plain dense weight."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight.T for a weight from `pack`: `onednn_linear` called directly (a custom
    op's dispatch costs more than a small product takes, and imports torch._dynamo at first use),
    or under torch.compile as one custom op (inductor lowers oneDNN's linear only for weights it
    packed itself)."""
    if torch.compiler.is_compiling():
        return _packed_linear_op(x, weight)
    return onednn_linear(x, weight)


@torch.library.custom_op("xllama::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return onednn_linear(x, weight)


@_packed_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T -> [..., N], by the fastest path for the device and the row
    count."""
    if not is_small(x):
        if (x.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
                and not (x.requires_grad or weight.requires_grad)  # oneDNN's op has no backward
                and not torch.compiler.is_compiling() and onednn_works(torch.float32)):
            # many rows (prefill) of a plain float32 weight: oneDNN's GEMM, which reorders the
            # weight as it goes, costs little against the arithmetic and beats ATen's (F.linear)
            return onednn_linear(x, weight)
        return F.linear(x, weight)
    n, k = weight.shape
    if torch.compiler.is_compiling() and x.numel() == k:
        # one row: inductor fuses a multiply-and-sum into one vectorised, multi-threaded GEMV
        # kernel, widening half-precision weights in registers and accumulating in float32.
        # (With several rows its kernel reads the weights once per row: the split product wins.)
        return (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)
    parts = thread_count()
    if parts == 1 or n % parts or not weight.is_contiguous():
        return F.linear(x, weight)
    rows = x.numel() // k
    y = torch.bmm(x.reshape(1, rows, k).expand(parts, rows, k),
                  weight.view(parts, n // parts, k).transpose(1, 2))
    return y.transpose(0, 1).reshape(*x.shape[:-1], n)


def thread_count() -> int:
    """torch's thread count; in a compiled graph, the count as the graph was traced. (Called in
    a traced graph, torch.get_num_threads would split the graph in two at every product.)"""
    return torch.get_num_threads()


# what torch.compiler.assume_constant_result sets, without the compiler's import it makes
thread_count._dynamo_marked_constant = True  # type: ignore[attr-defined]


class CpuLinear(nn.Linear):
    """An nn.Linear (same parameters, same names) whose product is `matmul`, or oneDNN's over a
    packed weight (`packed`: a flag, since torch.compile's fake tensors hide the layout)."""

    def __init__(self, linear: nn.Linear, packed: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if packed:
            self.weight = nn.Parameter(pack(linear.weight), requires_grad=False)
        else:
            self.weight = linear.weight
        self.bias = linear.bias
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(x, self.weight) if self.packed else matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


def use_cpu_kernels(model: nn.Module, decode_batch: int | None = 1, pack: bool = True,
                    release: Callable[[torch.Tensor], None] | None = None) -> nn.Module:
    """Swap every plain nn.Linear on the CPU for a CpuLinear, its weight packed where `pack` and
    `packable` say so for `decode_batch` sequences decoded together. One matrix at a time: the
    plain copy of one at most exists beside the packed model, and `release(plain)` is called once
    each is packed (e.g. to drop a memory-mapped checkpoint's pages it read). A tied head stays
    plain: packing it would hold the embedding table twice. Other devices keep nn.Linear, whose
    product is already the fast one there."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = [(parent, name) for parent in model.modules()
               for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.device.type == "cpu"]
    # largest first (the head): its source and packed copy are resident together while few
    # other packed matrices are, so the peak stays near the packed model's own size
    targets.sort(key=lambda t: -getattr(*t).weight.numel())
    for parent, name in targets:
        plain = getattr(parent, name)  # held (with its weight) until the next matrix rebinds it
        packed = pack and id(plain.weight) not in tied and packable(plain.weight, decode_batch)
        setattr(parent, name, CpuLinear(plain, packed))
        if packed and release is not None:
            release(plain.weight)
    return model
