"""The compiled decode step is one whole graph (no graph break, one graph for every step) for every
RoPE rule and for int8, and its int8 products compile to fused kernels that read the int8 weights,
never to ATen's `_weight_int8pack_mm`. Proven on the CPU: the step's graph is the one CUDA compiles
(tests/test_cuda.py and benchmarks/cuda_check.py look at it on a GPU)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from conftest import make_hf_checkpoint
from xllama_cli.generation import compile_decode, compile_options, generate_tokens
from xllama_cli.loading import load
from xllama_cli.quantize import int8_gemv, int8_matmul, quantize_int8

PROMPTS = [[5, 9, 33, 70, 2, 11, 4], [8, 41, 6]]  # unequal: rows at their own positions
# longer than the tiny model's trained 64 positions: dynamic RoPE's base grows as it decodes
LONG = [list(range(3, 69)), [8, 41, 6]]


def compiled_step_run(model, prompts: list[list[int]],
                      n: int = 4) -> tuple[int, int, str, list[list[int]]]:
    """Compile `model`'s decode step afresh and generate n tokens with it. Returns the graph breaks
    dynamo counted, the graphs it compiled, inductor's generated code and the tokens. (The one
    place that knows how the step is made and called.)"""
    counters.clear()
    step = compile_decode(model)
    out, code = run_and_get_code(generate_tokens, model, prompts, n, step=step)
    breaks = sum(counters["graph_break"].values())
    return breaks, counters["stats"]["unique_graphs"], "\n".join(code), out.tokens


def kernel_calls(code: str) -> list[str]:
    """The kernels inductor's generated module launches, in order (C++ and Triton alike)."""
    return re.findall(r"^\s+(\w*fused\w*)(?:\.run)?\(", code, flags=re.M)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_checkpoint(path, seed=4, num_key_value_heads=2)
    return path


@pytest.mark.parametrize("rope, factor, prompts", [
    ("rotary", None, PROMPTS),
    ("linear", 2.0, LONG),
    ("dynamic", 2.0, LONG),
    ("llama3", 8.0, PROMPTS),
])
def test_the_decode_step_compiles_as_one_graph_for_every_rope_rule(tiny, rope, factor, prompts):
    loaded = load(tiny, device="cpu", dtype="float32", rope=rope, rope_factor=factor, compile=True)
    breaks, graphs, _, _ = compiled_step_run(loaded.model, prompts)
    assert (breaks, graphs) == (0, 1)


@pytest.fixture(scope="module")
def int8_step(tiny):
    """The int8 model's decode step compiled at batch 1: (breaks, graphs, code, tokens), and the
    eager tokens."""
    loaded = load(tiny, device="cpu", quantize="int8", compile=True)
    eager = generate_tokens(loaded.model, PROMPTS[:1], 8).tokens
    return compiled_step_run(loaded.model, PROMPTS[:1], 8), eager


def test_the_int8_decode_step_compiles_as_one_graph(int8_step):
    (breaks, graphs, _, _), _ = int8_step
    assert (breaks, graphs) == (0, 1)


def test_the_compiled_int8_step_has_no_weight_int8pack_mm_and_reads_int8(int8_step):
    (_, _, code, tokens), eager = int8_step
    assert "_weight_int8pack_mm" not in code
    assert "extern_kernels.mm(" not in code and "extern_kernels.addmm(" not in code  # all fused
    assert "int8" in code  # the kernels load the int8 weights themselves
    assert tokens[0][:4] == eager[0][:4]  # float32 sums of the same products as the eager path


@pytest.mark.parametrize("rows", [1, 4])
def test_int8_gemv_compiles_to_one_kernel_that_reads_int8(rows):
    """The product the CUDA step uses for every decode batch (quantize.accelerator_int8_matmul),
    compiled here: one kernel, widening the int8 weights itself, no matrix-multiply call."""
    q, scales = quantize_int8(torch.randn(96, 64, generator=torch.Generator().manual_seed(rows)))
    x, s = torch.randn(rows, 1, 64).bfloat16(), scales.bfloat16()
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(int8_gemv, dynamic=False), x, q, s)
    code = "\n".join(code)
    assert len(kernel_calls(code)) == 1 and "extern_kernels." not in code.split("def call")[-1]
    assert "_weight_int8pack_mm" not in code
    want = F.linear(x.float(), q.float() * s.float()[:, None])
    assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_the_form_cuda_used_to_compile_is_matched_to_weight_int8pack_mm():
    """The detector above can fail: `linear(x, w.to(bf16)) * scales` compiles to ATen's int8 op."""
    q, scales = quantize_int8(torch.randn(96, 64))
    x, s = torch.randn(1, 1, 64).bfloat16(), scales.bfloat16()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s),
                                   x, q, s)
    assert "_weight_int8pack_mm" in "\n".join(code)


def test_int8_products_on_other_devices_take_the_fused_form_when_compiled(monkeypatch):
    """Routing of a non-CPU tensor (meta stands in for CUDA): compiled, int8_gemv for up to
    SMALL_ROWS rows; eager, the widened product with float32 scales."""
    from xllama_cli import quantize

    calls = []
    monkeypatch.setattr(quantize, "int8_gemv", lambda *a: calls.append("gemv") or a[0])
    q, s = torch.empty(96, 64, dtype=torch.int8, device="meta"), torch.empty(96, device="meta")
    x = torch.empty(4, 1, 64, dtype=torch.bfloat16, device="meta")
    assert int8_matmul(x, q, s.bfloat16()).shape == (4, 1, 96) and calls == []  # eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    int8_matmul(x, q, s.bfloat16())
    assert calls == ["gemv"]
    assert int8_matmul(torch.empty(64, 64, dtype=torch.bfloat16, device="meta"), q,
                       s.bfloat16()).shape == (64, 96) and calls == ["gemv"]  # many rows: widened


def test_compile_options_on_cuda_use_graphs_and_coordinate_descent_except_under_tp():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_options(cuda) == {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    assert compile_options(cuda, tensor_parallel=True)["triton.cudagraphs"] is False
    assert compile_options(cpu) == {}
    assert compile_options(cpu, "reduce-overhead") == {"triton.cudagraphs": True}
