"""Linear layers for inference: the weight-streaming product of decode at full memory bandwidth.

Decoding a token multiplies a few rows (one per sequence) by every weight matrix, so its speed is
the speed at which the weights stream from memory. ATen's CPU path for that product (a GEMV, or a
GEMM with a handful of rows) runs on one thread and reads about half what the memory delivers;
the same product as a batched multiply over the weight split by rows runs one part per thread.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Up to this many rows (batch x new tokens) a product is bound by reading the weights; above it
# (prefill) it is bound by arithmetic, where ATen's GEMM is already the fast path.
SMALL_ROWS = 16


def is_small(x: torch.Tensor) -> bool:
    """Whether x [..., K] has few enough rows for the weight-streaming paths (CPU only)."""
    return x.device.type == "cpu" and x.numel() <= SMALL_ROWS * x.shape[-1]


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T -> [..., N], by the fastest path for the device and row count."""
    if not is_small(x):
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

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        if self.reduce:
            dist.all_reduce(y)
        return y if self.bias is None else y + self.bias
