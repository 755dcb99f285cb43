"""Weight-only int8: one byte a weight and a scale per output channel (as gpt-fast does).

Activations stay in the model's half-precision dtype; a product widens the int8 weights as it
reads them, so decode reads half the bytes of bfloat16 (a quarter of float32). `quantize_model`
swaps every nn.Linear of a built model for an Int8Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SettingError
from .linear import SMALL_ROWS, agrees, is_small, probed

METHODS = ("int8",)
COMPUTE_DTYPES = (torch.bfloat16, torch.float16)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], float32 scales [N]) with weight ~= int8 * scale per row."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # symmetric: the row's largest |w| -> 127
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def int8_kernel_works(dtype: torch.dtype) -> bool:
    """Whether ATen's private int8 CPU kernel (`torch._weight_int8pack_mm`) gives the widened
    product's results for `dtype` inputs here, tried once per process on a shape it is known to
    serve (K a multiple of 16; see int8_matmul)."""
    def check() -> bool:
        g = torch.Generator().manual_seed(0)
        q, scales = quantize_int8(torch.randn(48, 32, generator=g))
        x, s = torch.randn(3, 32, generator=g).to(dtype), scales.to(dtype)
        want = F.linear(x.float(), q.float()) * s.float()
        return agrees(torch._weight_int8pack_mm(x, q, s), want)

    return probed(f"weight_int8pack_mm {dtype}", check)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (weight * scales[:, None]).T for int8 weight [N, K], scales [N] in x's dtype."""
    if x.device.type != "cpu":
        return accelerator_int8_matmul(x, weight, scales)
    if is_small(x):
        if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
            # one row, as in linear.matmul: inductor fuses the widening into one GEMV kernel
            return int8_gemv(x, weight, scales)
        if x.shape[-1] % 16 == 0 and int8_kernel_works(x.dtype):
            # ATen's int8 GEMV kernel for the CPU. It takes 2-D inputs, and with K not a multiple of
            # 16 (torch 2.13) returns inf/NaN or crashes the process: those shapes widen instead.
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight, scales)
            return y.reshape(*x.shape[:-1], weight.shape[0])
    # many rows (prefill), an odd K or no working kernel: widen, then the dtype's own GEMM
    return F.linear(x, weight.to(x.dtype)) * scales


def accelerator_int8_matmul(x: torch.Tensor, weight: torch.Tensor,
                            scales: torch.Tensor) -> torch.Tensor:
    """int8_matmul on CUDA (any device but the CPU).

    Compiled with few rows (the decode step): `int8_gemv`, one kernel that reads the int8 weights.
    Otherwise the weights are widened to x's dtype for its own GEMM, and the scales are applied in
    float32: a product written `linear(x, w.to(x.dtype)) * scales` in x's dtype is what inductor
    pattern-matches to ATen's `_weight_int8pack_mm`, whose CUDA kernel streams the weights at a
    small fraction of the bandwidth when there are few rows."""
    if torch.compiler.is_compiling() and x.numel() <= SMALL_ROWS * x.shape[-1]:
        return int8_gemv(x, weight, scales)
    return (F.linear(x, weight.to(x.dtype)).float() * scales.float()).to(x.dtype)


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8_matmul for few rows as a multiply-and-sum, which inductor compiles into one reduction
    kernel: it loads the int8 weights, widens them in registers and accumulates in float32, so a
    step reads one byte a weight. The sum is laid out [N, rows], so that the outputs a kernel
    computes side by side share a weight row, which is then read once for all the rows (a
    [rows, N] layout reads it once per row). Eagerly it would materialise [N, rows, K]: compiled
    steps only."""
    rows = x.reshape(-1, x.shape[-1]).float()
    y = (weight.float()[:, None, :] * rows[None]).sum(-1)  # [N, rows]
    return (y.t() * scales.float()).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Int8Linear(nn.Linear):
    """An nn.Linear whose weight is int8 with a scale per output channel; names and bias kept."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_int8(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.weight, self.scales)
        return y if self.bias is None else y + self.bias


def check_quantize(method: str | None, dtype: torch.dtype) -> None:
    """Refuse a method or compute dtype that quantize_model cannot serve, before anything loads."""
    if method is None:
        return
    if method not in METHODS:
        raise SettingError("unknown {quantize} {value!r}; choose: {valid}",
                           value=method, valid=", ".join(METHODS))
    if dtype not in COMPUTE_DTYPES:
        raise SettingError("{quantize} int8 computes in bfloat16 or float16 (ATen's CPU int8 "
                           "kernel is slower than float32 itself with float32 inputs); "
                           "use {dtype} bfloat16")


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every projection and the output head by Int8Linear, one at a time, so the
    full-precision copy of only one matrix exists beside the int8 model. The embedding table
    stays as it is (a lookup reads one row, not the table); a tied head is quantized on its own."""
    dtype = model.model.embed_tokens.weight.dtype
    check_quantize(method, dtype)
    if model.model.embed_tokens.weight.device.type == "cpu":
        int8_kernel_works(dtype)  # tried now: a compiled step must find the answer, not the trial
    targets = [(parent, name) for parent in model.modules()
               for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and not isinstance(child, Int8Linear)]
    for parent, name in targets:
        setattr(parent, name, Int8Linear(getattr(parent, name), dtype))
    return model
