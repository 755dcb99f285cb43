"""int4_gemm.py: a prompt's product over int4 weights in ATen's int4pack form, the weight widened to
bf16 a chunk of rows at a time by a numba loop, then oneDNN's bf16 GEMM. The loop reads int4pack's
form (whole blocks of 64 rows and a last, partial one) to the bit of its bf16 rounding, a product
over several chunks is the product over one (as for vnni.py's widened forms), and the tuner
offers it for many rows only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xllama_cli import int4_gemm, vnni
from xllama_cli.linear import measure
from xllama_cli.quantize import (INT4, INT8, Int4Linear, Int8Linear, int4_reference, int4pack,
                                 int8_reference, int8_vnni_form, unpack_nibbles, int4_vnni_form)

if int4_gemm._loop() is None:
    pytest.skip("numba is not usable here", allow_module_level=True)


def layer(n: int, k: int, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    return Int4Linear(nn.Linear(k, n, bias=False), torch.bfloat16)


def test_int4packs_form_is_the_one_the_loop_reads():
    assert int4_gemm.layout_is_known() and int4_gemm.fits(200, 128)


@pytest.mark.parametrize("n", [192, 200, 80])  # whole blocks; and a partial last one (208, 80 rows)
def test_widened_rows_are_the_int4pack_weights_rounded_to_bf16(n):
    source = layer(n, 128)
    packed, sz, _ = int4pack(source)
    scales, zeros = sz[..., 0].float().contiguous(), sz[..., 1].float().contiguous()
    got = int4_gemm.widened_rows(packed, scales, zeros, 0, packed.shape[0]).t()[:n]
    # int4pack holds each group's scale and zero in bf16: the weights it multiplies by
    q = unpack_nibbles(source.weight).float().view(n, -1, 32) - 8
    want = (q * scales.t()[:n, :, None] + zeros.t()[:n, :, None]).view(n, -1).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # the same value to the bit, but where one multiply-add rounds once instead of twice
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -8, atol=0)
    assert (got == want).float().mean() > 0.99


# the prompt products that widen a weight a chunk of rows at a time: int4pack's form (chunks of
# whole 64-row blocks), and vnni.py's int4 and int8 forms (48 rows a chunk, the last 8)
WIDENED = [("int4pack", 64 * 128), ("vnni int4", 48 * 128), ("vnni int8", 48 * 128)]


@torch.no_grad()
@pytest.mark.parametrize("form,chunk", WIDENED, ids=[w[0] for w in WIDENED])
def test_a_product_over_many_chunks_is_the_product_over_one(monkeypatch, form, chunk):
    if form.startswith("vnni") and not vnni.usable():
        pytest.skip("neither AVX-512 VNNI nor AVX2 here")
    module, product, source, reference, tol = {
        "int4pack": (int4_gemm, int4_gemm.widened_int4pack_linear, layer(200, 128, seed=1),
                     int4_reference, INT4.tol),
        "vnni int4": (vnni, vnni.widened_linear, layer(200, 128, seed=1), int4_reference,
                      INT4.tol),
        "vnni int8": (vnni, vnni.int8_widened_linear,
                      Int8Linear(nn.Linear(128, 200, bias=False), torch.bfloat16),
                      int8_reference, INT8.tol),
    }[form]
    state = {"int4pack": int4pack, "vnni int4": int4_vnni_form, "vnni int8": int8_vnni_form}[form](source)
    x = torch.randn(37, 128, generator=torch.Generator().manual_seed(2))
    whole = product(x, state)
    monkeypatch.setattr(module, "CHUNK_WEIGHTS", chunk)
    chunked = product(x, state)
    assert whole.shape == (37, 200) and whole.dtype == torch.float32
    assert torch.equal(chunked, whole)
    want = reference(x, source)
    assert torch.allclose(whole, want, rtol=tol, atol=tol * want.abs().max().item())


def test_the_tuner_times_it_for_many_rows_only():
    times = measure(INT4, [layer(128, 64)], tied=False, few_rows=1)["int4pack"]
    assert "widen-bf16" in times["many"] and "widen-bf16" not in times["few"]
    assert "int4pack" in times["few"] and "int4pack" in times["many"]
