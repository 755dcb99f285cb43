"""Linear layers for inference: the weight-streaming product of decode at full memory bandwidth.

Decoding a token multiplies a few rows (one per sequence) by every weight matrix, so its speed is
the speed at which the weights stream from memory. ATen's CPU path for that product (a GEMV, or a
GEMM with a handful of rows) runs on one thread and reads about half what the memory delivers;
the same product as a batched multiply over the weight split by rows runs one part per thread.

Faster still on the CPU, for every row count, is oneDNN's product over a weight reordered once into
its blocked layout (`pack`, done at load time by `pack_model`): the weight streams in the order
oneDNN's kernel reads it, spread over the threads, and bfloat16 uses the CPU's own bf16 dot-product
instructions where it has them. A packed weight is opaque (no strides, no gradient): inference only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import release_pages

# Up to this many rows (batch x new tokens) a product is bound by reading the weights; above it
# (prefill) it is bound by arithmetic, where ATen's GEMM is already the fast path.
SMALL_ROWS = 16


def is_small(x: torch.Tensor) -> bool:
    """Whether x [..., K] has few enough rows for the weight-streaming paths (CPU only)."""
    return x.device.type == "cpu" and x.numel() <= SMALL_ROWS * x.shape[-1]


def packable(weight: torch.Tensor, decode_batch: int | None = None) -> bool:
    """Whether a packed weight (`pack`) is the faster one for this CPU, dtype and decode batch.

    bfloat16: where oneDNN computes it natively (AVX-512 BF16 or AMX; elsewhere it emulates it,
    slower than ATen). float32: unless the model decodes one sequence at a time (decode_batch 1),
    where the split product (`matmul`) streams faster than oneDNN's; prefill and several rows are
    faster packed (decode_batch None: no decoding, e.g. perplexity)."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return decode_batch != 1
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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
    return _packed_linear_op(x, weight) if torch.compiler.is_compiling() else onednn_linear(x, weight)


@torch.library.custom_op("xllama::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return onednn_linear(x, weight)


@_packed_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T -> [..., N], by the fastest path for the device and row count."""
    if not is_small(x):
        if (x.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
                and not (x.requires_grad or weight.requires_grad)  # oneDNN's op has no backward
                and torch.backends.mkldnn.is_available() and not torch.compiler.is_compiling()):
            # many rows (prefill) of a plain float32 weight: oneDNN's GEMM, which reorders the weight
            # as it goes, costs little against the arithmetic: 1.1-1.2x ATen's (F.linear) here
            return onednn_linear(x, weight)
        return F.linear(x, weight)
    n, k = weight.shape
    if torch.compiler.is_compiling() and x.numel() == k:
        # one row: inductor fuses a multiply-and-sum into one vectorised, multi-threaded GEMV
        # kernel, widening half-precision weights in registers and accumulating in float32.
        # (With several rows its kernel reads the weights once per row: the split product wins.)
        return (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)
    parts = torch.get_num_threads()
    if parts == 1 or n % parts or not weight.is_contiguous():
        return F.linear(x, weight)
    rows = x.numel() // k
    y = torch.bmm(x.reshape(1, rows, k).expand(parts, rows, k), weight.view(parts, n // parts, k).transpose(1, 2))
    return y.transpose(0, 1).reshape(*x.shape[:-1], n)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) computed by `matmul`.

    `reduce`: the input features are split across tensor-parallel ranks, so the partial products
    are summed by one all-reduce before the bias is added (once, not once per rank).
    """

    reduce: bool = False
    packed: bool = False  # the weight is oneDNN's (`pack`); a flag, since torch.compile's fake tensors hide the layout

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight) if self.packed else matmul(x, self.weight)

    def pack(self) -> None:
        """Hold the weight as `pack` does, for inference (a packed weight takes no gradient)."""
        plain = self.weight
        self.weight = nn.Parameter(pack(plain), requires_grad=False)
        self.packed = True
        release_pages(plain)  # a memory-mapped checkpoint's pages, read once by packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        if self.reduce:
            dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


def pack_model(model: nn.Module, decode_batch: int | None = None) -> nn.Module:
    """Pack every projection and the head for which `packable` says so, one at a time (the plain
    copy of one matrix at most exists beside the packed model). A tied head stays as it is:
    packing it would hold the embedding table twice."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = [m for m in model.modules()
               if type(m) is Linear and id(m.weight) not in tied and packable(m.weight, decode_batch)]
    # largest first (the head): its source and packed copy are resident together while few
    # other packed matrices are, so the peak stays near the packed model's own size
    for m in sorted(targets, key=lambda m: -m.weight.numel()):
        m.pack()
    return model
