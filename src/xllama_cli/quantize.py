"""Weight-only quantization at load time: int8 (a scale per output channel, as gpt-fast does) and
int4 (groups of GROUP weights along the input, a scale and a zero each).

`quantize_model` swaps every nn.Linear of a built model for an Int8Linear or Int4Linear, whose own
product (the reference) widens the weights to the activations' dtype. On the CPU, linear.py then
chooses among the kernels below by measurement (`INT8`, `INT4`: the layouts each weight can be
held in and the products that read them): fused products that read one byte (int8) or half a
byte (int4) a weight, with no widened copy. Activations stay in the model's half-precision dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import int4_gemm, vnni
from .errors import SettingError
from .linear import SMALL_ROWS, Kind, Layout, Product, agrees, is_small, probed

METHODS = ("int8", "int4")
COMPUTE_DTYPES = (torch.bfloat16, torch.float16)
GROUP = 32  # int4: weights along the input that share a scale and a zero (llama.cpp's Q4_0: 32)
CLIPS = (1.0, 0.95, 0.9)  # int4: the narrowings of a group's range tried (quantize_int4)
CHUNK = 512  # int4: rows quantized at a time
INT4_ROWS = 16  # ATen's int4 CPU kernel takes a multiple of this many output rows
TOL = 3e-2  # a quantized product against the dequantized weights' float32 product (relative)


# ---- int8 ----
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

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype, which the scales are kept in."""
        return self.scales.dtype

    @property
    def kernel_kind(self) -> Kind:
        return INT8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.weight, self.scales)
        return y if self.bias is None else y + self.bias


# the CPU kernels of an Int8Linear, among which linear.py chooses
def int8pack_linear(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """ATen's int8 CPU kernel: widens each int8 weight in registers as it reads it. It takes 2-D
    inputs, and with K not a multiple of 16 (torch 2.13) returns inf/NaN or crashes the
    process: those shapes are not given to it (`fits`). It is many times slower on float32
    inputs than on its scales' dtype, so float32 inputs are rounded to that dtype first."""
    q, scales = state
    if x.dtype != scales.dtype:
        return torch._weight_int8pack_mm(x.to(scales.dtype), q, scales).to(x.dtype)
    return torch._weight_int8pack_mm(x, q, scales)


def widened_linear(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.linear(x, state[0].to(x.dtype)) * state[1]


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x as int8 with a scale of its own (xq, step: x ~ xq * step), as llama.cpp
    quantizes activations for Q8_0."""
    xf = x.float()
    step = xf.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    return torch.round(xf / step).to(torch.int8), step


def int_mm_linear(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """int8 x int8 -> int32 (`torch._int_mm`: VNNI/AMX where the CPU has them), each row of x
    quantized on the fly (int8_rows)."""
    q, scales = state
    xq, step = int8_rows(x)
    return (torch._int_mm(xq, q.t()) * (step * scales.float())).to(x.dtype)


def int8_form_int_mm_linear(x: torch.Tensor, state: vnni.Int8State) -> torch.Tensor:
    """int_mm_linear over vnni's int8 form, for a prompt's rows: the form holds q + 128 as uint8,
    whose top bit flipped is q's int8 bits; flipped a chunk of rows at a time into one buffer, so
    that a prompt costs no second copy of the weights (the form's padding flips to zero weights)."""
    form, scales, n, k = state
    width = form.shape[1]
    xq, step = int8_rows(F.pad(x, (0, width - k)))
    rows = min(n, max(1, 4 * vnni.CHUNK_WEIGHTS // width))  # 8 MiB (2 MiB ran slower)
    flipped = torch.empty(rows, width, dtype=torch.uint8)
    y = torch.empty(x.shape[0], n, dtype=torch.int32)
    for first in range(0, n, rows):
        part = flipped[:min(rows, n - first)]
        torch.bitwise_xor(form[first:first + part.shape[0]], 128, out=part)
        y[:, first:first + part.shape[0]] = torch._int_mm(xq, part.view(torch.int8).t())
    return (y * (step * scales)).to(x.dtype)


def fbgemm_int8_pack(layer: nn.Module) -> Any:
    """The int8 weight and its scales in fbgemm's packed form (an opaque object)."""
    n = layer.out_features
    qw = torch._make_per_channel_quantized_tensor(layer.weight, layer.scales.double(),
                                                  torch.zeros(n, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def fbgemm_int8_linear(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """fbgemm's int8 product. It quantizes its input with one scale for all rows; each row is
    divided by its largest |value| first (and the output multiplied back), so each row gets a
    scale of its own, as in int_mm_linear. One row (a decode step's) has its own already: those
    four ops cost a 1024x1024 product three quarters of its time again."""
    xf = x.float()
    if xf.shape[0] == 1:
        return torch.ops.quantized.linear_dynamic(xf, packed).to(x.dtype)
    peak = xf.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    return (torch.ops.quantized.linear_dynamic(xf / peak, packed) * peak).to(x.dtype)


def fbgemm_int8_works(dtype: torch.dtype) -> bool:
    def check() -> bool:
        layer = Int8Linear(nn.Linear(40, 48, bias=False), dtype)
        x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
        return agrees(fbgemm_int8_linear(x, fbgemm_int8_pack(layer)), int8_reference(x, layer), TOL)

    return probed("fbgemm int8", check)


def int8_reference(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The product of the dequantized weights, in float32."""
    return F.linear(x.float(), layer.weight.float() * layer.scales.float()[:, None])


def _int8_state(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.weight, layer.scales


def int8_vnni_form(layer: nn.Module) -> vnni.Int8State:
    return vnni.pack_int8(layer.weight, layer.scales)


INT8 = Kind("int8", (
    Layout("plain", _int8_state, (
        Product("widen", widened_linear),
        Product("int8pack", int8pack_linear, lambda n, k: k % 16 == 0),
        Product("int_mm", int_mm_linear)),
        keeps_source=True),
    Layout("fbgemm", fbgemm_int8_pack, (Product("fbgemm", fbgemm_int8_linear),),
           fbgemm_int8_works),
    Layout("vnni", int8_vnni_form, (
        Product("vnni", vnni.int8_linear, lambda n, k: k % GROUP == 0 and vnni.serves_vnni(n, k),
                many=False),
        Product("avx2", vnni.int8_avx2_linear,
                lambda n, k: k % GROUP == 0 and vnni.serves_avx2(n, k), many=False),
        Product("widen-bf16", vnni.int8_widened_linear, few=False),
        Product("int_mm", int8_form_int_mm_linear, few=False),
    ), lambda dtype: vnni.usable()),
), int8_reference, TOL)


# ---- int4 ----
def quantize_int4(weight: torch.Tensor, group: int = GROUP
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] (K a multiple of `group`) -> (q uint8 [N, K] in 0..15, scales and zeros
    [N, K / group], float32), with weight ~= (q - 8) * scale + zero in each group of `group`
    weights along a row (ATen's int4 convention: zero is the middle of the group's range).

    A group's range is its [min, max] narrowed by the ratio of CLIPS that quantizes it with the
    least squared error, of those that leave every weight within one step of its level: the
    group's few largest weights then round to its ends while the many small ones get finer
    steps. Rows are taken CHUNK at a time, so that the search's passes run in the CPU's cache."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"int4 groups of {group} do not divide a row of {k}")
    q = torch.empty(n, k, dtype=torch.uint8)
    scales, zeros = torch.empty(n, k // group), torch.empty(n, k // group)
    for r in range(0, n, CHUNK):
        w = weight[r:r + CHUNK].float().view(-1, k // group, group)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        span = ((hi - lo) / 15).clamp_(min=1e-12)
        best = ratio = None
        for c in CLIPS:
            t = (w - lo * c).div_(span * c)  # in steps above the narrowed range's low end
            off = t - t.round().clamp_(0, 15)
            err = off.square().sum(-1, keepdim=True) * (span * c) ** 2
            err[off.abs().amax(-1, keepdim=True) > 1] = float("inf")  # a weight a step away or more
            if best is None:
                best, ratio = err, torch.full_like(err, c)
            else:
                better = err < best
                best, ratio = torch.where(better, err, best), torch.where(better, c, ratio)
        step, low = span * ratio, lo * ratio
        q[r:r + CHUNK] = (w - low).div_(step).round_().clamp_(0, 15).view(-1, k).to(torch.uint8)
        scales[r:r + CHUNK], zeros[r:r + CHUNK] = step[..., 0], (low + 8 * step)[..., 0]
    return q, scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """quantize_int4's output -> float32 weights [N, K]."""
    n, k = q.shape
    groups = scales.shape[1]
    w = (q.view(n, groups, k // groups).float() - 8) * scales[..., None] + zeros[..., None]
    return w.view(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> uint8 [N, K / 2], two a byte (even columns low)."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), -1).view(packed.shape[0], -1)


# an Int4Linear's weights as its products take them: (uint8 [N, K / 2], scales, zeros)
Int4State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def int4_state(layer: nn.Module) -> Int4State:
    return layer.weight, layer.scales, layer.zeros


def int4_weight(state: Int4State) -> torch.Tensor:
    """An Int4Linear's weights dequantized, float32 [N, K]."""
    packed, scales, zeros = state
    return dequantize_int4(unpack_nibbles(packed), scales, zeros)


def int4_reference(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    return F.linear(x.float(), int4_weight(int4_state(layer)))


def widened_int4_linear(x: torch.Tensor, state: Int4State) -> torch.Tensor:
    """Dequantize every weight into x's dtype, then its GEMM: an Int4Linear's own product."""
    return F.linear(x, int4_weight(state).to(x.dtype))


def int4pack(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The weights in the layout of ATen's int4 CPU kernel (`_convert_weight_to_int4pack_for_cpu`)
    with the scales and zeros as it takes them ([groups, N, 2] in the activations' dtype), the
    rows padded to a multiple of INT4_ROWS; and the true N."""
    q = unpack_nibbles(layer.weight)
    n = q.shape[0]
    rows = -(-n // INT4_ROWS) * INT4_ROWS
    q = F.pad(q, (0, 0, 0, rows - n), value=8).to(torch.int32)  # padded rows: all zero weights
    sz = torch.stack((layer.scales, layer.zeros), -1)
    sz = F.pad(sz, (0, 0, 0, 0, 0, rows - n)).transpose(0, 1).contiguous().to(layer.dtype)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), sz, n


def int4pack_linear(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
    """ATen's int4 CPU kernel: unpacks and dequantizes each group in registers as it reads it."""
    packed, sz, n = state
    group = x.shape[-1] // sz.shape[0]
    # in its scales' dtype: with float32 inputs it is many times slower
    y = torch._weight_int4pack_mm_for_cpu(x.to(sz.dtype).contiguous(), packed, group, sz)
    return (y if y.shape[-1] == n else y[:, :n]).to(x.dtype)


def int4pack_works(dtype: torch.dtype) -> bool:
    def check() -> bool:
        layer = Int4Linear(nn.Linear(64, 48, bias=False), dtype)
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
        return agrees(int4pack_linear(x, int4pack(layer)), int4_reference(x, layer), TOL)

    return probed(f"int4pack {dtype}", check)


def int4_vnni_form(layer: nn.Module) -> vnni.State:
    """The weights in vnni's int4 form, and N and K."""
    q = unpack_nibbles(layer.weight)
    return vnni.pack(q, layer.scales, layer.zeros), q.shape[0], q.shape[1]


INT4 = Kind("int4", (
    Layout("plain", int4_state, (Product("widen", widened_int4_linear),), keeps_source=True),
    Layout("int4pack", int4pack, (
        Product("int4pack", int4pack_linear),
        Product("widen-bf16", int4_gemm.widened_int4pack_linear, int4_gemm.fits, few=False),
    ), int4pack_works),
    Layout("vnni", int4_vnni_form, (
        Product("vnni", vnni.vnni_linear, vnni.serves_vnni, many=False),
        Product("avx2", vnni.avx2_linear, vnni.serves_avx2, many=False),
        Product("widen-bf16", vnni.widened_linear, few=False),
    ), lambda dtype: vnni.usable()),
), int4_reference, TOL)


class Int4Linear(nn.Module):
    """A linear layer whose weights are int4 in groups of GROUP along the input (quantize_int4),
    two a byte (`weight`, uint8 [N, K / 2]), with float32 `scales` and `zeros` [N, K / GROUP];
    its product dequantizes them into `dtype`, the activations' dtype. Bias kept."""

    kernel_kind = INT4

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, group: int = GROUP) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales, zeros = quantize_int4(linear.weight.detach(), group)
        self.register_buffer("weight", pack_nibbles(q))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = linear.bias
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = widened_int4_linear(x, int4_state(self))
        return y if self.bias is None else y + self.bias


# ---- the model ----
def check_quantize(method: str | None, dtype: torch.dtype) -> None:
    """Refuse a method or compute dtype that quantize_model cannot serve, before anything loads."""
    if method is None:
        return
    if method not in METHODS:
        raise SettingError("unknown {quantize} {value!r}; choose: {valid}",
                           value=method, valid=", ".join(METHODS))
    if dtype not in COMPUTE_DTYPES:
        raise SettingError("{quantize} {value} computes in bfloat16 or float16 (the CPU's int8 "
                           "and int4 kernels are slower than float32 itself with float32 "
                           "inputs); use {dtype} bfloat16", value=method)


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every projection and the output head by Int8Linear (or Int4Linear), one at a time,
    so the full-precision copy of only one matrix exists beside the quantized model. The
    embedding table stays as it is (a lookup reads one row, not the table); a tied head is
    quantized on its own. int4 keeps two kinds of layer at int8: the output head, whose
    rounding every token's logits meet (llama.cpp's Q4_0 files keep it at 6 bits), and a layer
    whose input no whole number of groups spans (which llama.cpp refuses to quantize to Q4_0)."""
    dtype = model.model.embed_tokens.weight.dtype
    check_quantize(method, dtype)
    if model.model.embed_tokens.weight.device.type == "cpu":
        int8_kernel_works(dtype)  # tried now: a compiled step must find the answer, not the trial
    targets = [(parent, name) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in targets:
        linear = getattr(parent, name)
        int4 = method == "int4" and linear is not model.lm_head and linear.in_features % GROUP == 0
        setattr(parent, name, Int4Linear(linear, dtype) if int4 else Int8Linear(linear, dtype))
    return model
