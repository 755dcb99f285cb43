"""vnni.py: int4 weights in a row-major form read by an AVX-512 VNNI loop (activations
quantized to int8 in groups of 32, as llama.cpp's Q8_0 ones), and the same form widened to bf16
for a prompt's rows. The integer arithmetic is exact (activations that int8 holds give the
float32 product of the dequantized weights), rounding the activations costs about a percent, the
widened rows are the weights rounded to bf16, and the tuner offers each product on its side only,
and the form only on a CPU with the instructions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT
from xllama_cli import vnni
from xllama_cli.jit import NO_SCALES
from xllama_cli.linear import measure
from xllama_cli.quantize import (INT4, INT8, Int4Linear, Int8Linear, int4_reference, int8_reference,
                                 int8_form_int_mm_linear, int8_vnni_form, int_mm_linear, unpack_nibbles,
                                 int4_vnni_form)

if not vnni.usable():
    pytest.skip("neither AVX-512 VNNI nor AVX2, or no numba, here", allow_module_level=True)


def layer(n: int, k: int, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    return Int4Linear(nn.Linear(k, n, bias=False), torch.bfloat16)


def held_weights(source: Int4Linear) -> torch.Tensor:
    """The weights the form holds: each group's scale and zero in bf16, float32 [N, K]."""
    q = unpack_nibbles(source.weight).float()
    n, k = q.shape
    s, z = (t.bfloat16().float()[:, :, None] for t in (source.scales, source.zeros))
    return ((q.view(n, k // 32, 32) - 8) * s + z).view(n, k)


# K: whole blocks; groups padded to a whole number of blocks (96: 3 groups); N odd
def int8_layer(n: int, k: int, seed: int = 0) -> Int8Linear:
    torch.manual_seed(seed)
    return Int8Linear(nn.Linear(k, n, bias=False), torch.bfloat16)


def exact_activations(rows: int, k: int) -> torch.Tensor:
    """Each group of 32 a whole multiple of its scale, its largest at 127 steps: int8 holds them
    as they are."""
    gen = torch.Generator().manual_seed(1)
    steps = torch.randint(-127, 128, (rows, k // 32, 32), generator=gen).float()
    steps[:, :, 0] = 127
    return (steps * torch.rand(rows, k // 32, 1, generator=gen)).view(rows, k)


ISAS = vnni.isas()  # both where the CPU has AVX-512 VNNI, and then both are tested


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,rows", [(64, 256, 1), (37, 96, 3), (200, 2816 // 4, 2)])
def test_activations_int8_holds_give_the_exact_product(n, k, rows, isa):
    """Nothing is rounded, so any misplaced nibble, scale or group would show beyond float32's
    rounding."""
    source = layer(n, k)
    x = exact_activations(rows, k)
    got = vnni._int4_linear(isa, x, int4_vnni_form(source))
    want = x @ held_weights(source).t()
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@torch.no_grad()
@pytest.mark.parametrize("isa", ISAS)
def test_rounding_the_activations_costs_about_a_percent_of_the_largest_output(isa):
    source = layer(300, 1024, seed=2)
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(3))
    want = int4_reference(x, source)
    got = vnni._int4_linear(isa, x, int4_vnni_form(source))
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert 0 < err < 0.015
    assert vnni._int4_linear(isa, x.bfloat16(), int4_vnni_form(source)).dtype == torch.bfloat16


@pytest.mark.parametrize("n,k", [(48, 128), (7, 96)])
def test_widened_rows_are_the_held_weights_rounded_to_bf16(n, k):
    source = layer(n, k, seed=4)
    got = vnni.widened_rows(int4_vnni_form(source), 0, n)
    want = held_weights(source)
    assert got.dtype == torch.bfloat16 and got.shape == (n, k)
    # the loop computes q s + (z - 8 s) in float32: a value can land one bf16 step away
    assert torch.allclose(got.float(), want, rtol=2 ** -7, atol=0)
    assert (got == want.to(torch.bfloat16)).float().mean() > 0.99


def test_the_tuner_times_each_product_on_its_own_side():
    """Each instruction set's loop for few rows (both where the CPU has both: which is faster
    is measured), the widened form for many."""
    times = measure(INT4, [layer(128, 64)], tied=False, few_rows=1)["vnni"]
    assert set(times["few"]) == set(vnni.isas()) and set(times["many"]) == {"widen-bf16"}


# K: whole blocks of 128; padded (96, 2816 = 22 blocks of 128, 160)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,rows", [(64, 256, 1), (37, 96, 3), (200, 2816, 2), (16, 160, 1)])
def test_int8_activations_int8_holds_give_the_exact_product(n, k, rows, isa):
    source = int8_layer(n, k)
    x = exact_activations(rows, k)
    got = vnni._int8_linear(isa, x, int8_vnni_form(source))
    want = int8_reference(x, source)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@torch.no_grad()
def test_int8_rounding_the_activations_costs_under_a_percent_and_widening_is_exact():
    source = int8_layer(300, 1024, seed=2)
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(3))
    want = int8_reference(x, source)
    state = int8_vnni_form(source)
    err = ((vnni._int8_linear(ISAS[0], x, state) - want).abs().max() / want.abs().max()).item()
    assert 0 < err < 0.01
    weights = (source.weight.float() * source.scales.float()[:, None]).to(torch.bfloat16)
    assert torch.equal(vnni.int8_widened_rows(state, 0, 300)[:, :1024], weights)
    wide = vnni.int8_widened_linear(x, state)
    assert torch.allclose(wide, want, rtol=INT8.tol, atol=INT8.tol * want.abs().max().item())


def test_the_tuner_times_the_int8_form_on_each_side_and_only_for_whole_groups():
    times = measure(INT8, [int8_layer(128, 64)], tied=False, few_rows=1)["vnni"]
    assert set(times["few"]) == set(vnni.isas()) and set(times["many"]) == {"widen-bf16", "int_mm"}
    odd = measure(INT8, [int8_layer(128, 40)], tied=False, few_rows=1)  # no whole group in a row
    assert not odd.get("vnni", {}).get("few")  # so the form is never chosen (linear.best)


@torch.no_grad()
@pytest.mark.parametrize("n,k", [(300, 1024), (37, 96), (5000, 160)])  # padded K; several chunks
def test_int_mm_over_the_int8_form_gives_the_plain_int8_weights_int_mm_product(n, k, monkeypatch):
    """The form's bytes (q + 128) with the top bit flipped are q: the product is the plain
    layout's, to the bit, chunk by chunk."""
    monkeypatch.setattr(vnni, "CHUNK_WEIGHTS", 1 << 16)
    source = int8_layer(n, k, seed=5)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(6))
    got = int8_form_int_mm_linear(x, int8_vnni_form(source))
    assert torch.equal(got, int_mm_linear(x, (source.weight, source.scales)))
    want = int8_reference(x, source)
    assert torch.allclose(got, want, rtol=INT8.tol, atol=INT8.tol * want.abs().max().item())


def test_no_form_where_the_cpu_lacks_the_instructions(monkeypatch):
    monkeypatch.setattr(vnni, "_isa", lambda: None)  # neither AVX-512 VNNI nor AVX2
    assert not vnni.usable()
    assert "vnni" not in measure(INT4, [layer(128, 64)], tied=False, few_rows=1)
    assert "vnni" not in measure(INT8, [int8_layer(128, 64)], tied=False, few_rows=1)


@torch.no_grad()
def test_the_avx2_loops_give_the_vnni_loops_products():
    """Where the CPU has both, the AVX2 path (vpmaddubsw, vpmaddwd; int8 by |xq| and q with
    xq's sign) gives what vpdpbusd gives: int4 to the bit, int8 to float32's rounding of the
    VNNI path's offset. (On a CPU with AVX2 only, the other tests run the AVX2 path.)"""
    if vnni._isa() != "vnni":
        pytest.skip("no AVX-512 VNNI here to compare with")
    paths = {isa: vnni._kernels(isa) for isa in ("vnni", "avx2")}
    x = torch.randn(3, 2816, generator=torch.Generator().manual_seed(7))
    int4 = int4_vnni_form(layer(200, 2816, seed=8))[0].numpy()
    int8, scales, _, _ = int8_vnni_form(int8_layer(200, 2816, seed=9))
    got = {}
    for isa, loops in paths.items():
        y4, y8 = torch.zeros(3, 200), torch.zeros(3, 200)
        loops["int4"](x.numpy(), int4, NO_SCALES, y4.numpy())
        loops["int8"](x.numpy(), int8.numpy(), scales.numpy(), y8.numpy())
        got[isa] = (y4, y8)
    assert torch.equal(got["avx2"][0], got["vnni"][0])
    want = got["vnni"][1]
    assert torch.allclose(got["avx2"][1], want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_no_form_where_numba_compiles_for_another_cpu():
    """NUMBA_CPU_NAME=generic (portable machine code): LLVM could not select vpdpbusd or AVX2's
    instructions there, and would abort the process, so the forms are not offered."""
    code = "from xllama_cli import vnni; print(vnni.usable())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NUMBA_CPU_NAME="generic", PYTHONPATH=str(ROOT / "src")))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False"]
