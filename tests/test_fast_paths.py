"""The decode speed paths (the split GEMV, oneDNN-packed weights, the compiled decode step) change
no result: products against F.linear, greedy tokens against transformers and against the eager
model. A private op that is missing or wrong here is not used. (Every kernel, and how one is
chosen: test_kernels.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from conftest import computing_layers, make_hf_checkpoint
from torch import nn

from xllama_cli import linear, load_model
from xllama_cli.generation import compile_decode, generate_tokens
from xllama_cli.linear import (SMALL_ROWS, Choice, CpuLinear, Tuner, fixed, matmul, onednn_works, pack,
                               packed_linear, use_cpu_kernels)
from xllama_cli.loading import load

needs_bf16_packing = pytest.mark.skipif(not onednn_works(torch.bfloat16),
                                        reason="oneDNN has no native bfloat16 on this CPU")
PACKED = Choice("onednn", "onednn", "onednn")
SPLIT = Choice("plain", "split", "aten")


@pytest.fixture
def threads():
    """Set torch's thread count for one test (the split path uses one part per thread)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_threads", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 3, SMALL_ROWS])
def test_split_product_equals_f_linear(threads, n_threads, rows):
    threads(n_threads)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96 * n_threads, 80, generator=g)
    x = torch.randn(rows, 1, 80, generator=g)
    got, want = matmul(x, w), F.linear(x, w)
    assert got.shape == want.shape == (rows, 1, 96 * n_threads)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.allclose(matmul(xb, wb).float(), F.linear(xb, wb).float(), rtol=2e-2, atol=2e-2)


def test_split_path_is_taken_for_few_rows_only(threads, monkeypatch):
    threads(2)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    w = torch.randn(64, 32)
    matmul(torch.randn(1, 32), w)
    assert calls == [1]
    big = torch.randn(SMALL_ROWS + 1, 32)
    assert torch.allclose(matmul(big, w), F.linear(big, w), rtol=1e-5, atol=1e-5)  # prefill: oneDNN's GEMM
    assert calls == [1]


def test_rows_that_do_not_split_evenly_fall_back_to_f_linear(threads):
    threads(2)
    x = torch.randn(1, 16)
    odd = torch.randn(33, 16)
    assert torch.equal(matmul(x, odd), F.linear(x, odd))
    strided = torch.randn(16, 64).t()  # not contiguous: no row-split view of it
    assert torch.equal(matmul(x, strided), F.linear(x, strided))


@pytest.mark.parametrize("rows", [1, 3, SMALL_ROWS + 1, 128])
def test_packed_product_equals_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 72, generator=g)
    x = torch.randn(rows, 1, 72, generator=g)
    got, want = packed_linear(x, pack(w)), F.linear(x, w)
    assert got.shape == want.shape == (rows, 1, 200)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(packed_linear(x[:, 0], pack(w)), want[:, 0], rtol=1e-5, atol=1e-5)  # 2-D too


@needs_bf16_packing
def test_packed_bfloat16_product_equals_f_linear():
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(5, 64, generator=g).bfloat16()
    want = F.linear(x.float(), w.float())
    assert torch.allclose(packed_linear(x, pack(w)).float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_load_model_swaps_the_cpu_projections_for_inference_only(tmp_path):
    make_hf_checkpoint(tmp_path, seed=6, num_key_value_heads=2, tie_word_embeddings=True)
    linears = computing_layers
    for decode_batch in (None, 1, 8):
        model = load_model(tmp_path, device="cpu", dtype="float32", decode_batch=decode_batch)
        assert all(type(x) is CpuLinear and x.kind == "float32" for x in linears(model))
        # a tied head is the embedding table itself: a copy in another layout would hold it twice
        assert model.lm_head.choice.layout == "plain" and model.lm_head.weight is model.model.embed_tokens.weight
    compiled = load(tmp_path, device="cpu", dtype="float32", decode_batch=8, compile=True).model
    assert all(x.choice == Choice("compiled", "matmul", "matmul") for x in linears(compiled))  # inductor's
    # to train: the plain model, nn.Linear throughout
    trained = load_model(tmp_path, device="cpu", dtype="float32", decode_batch=None, pack=False)
    assert all(type(x) is nn.Linear for x in linears(trained))
    int8 = load_model(tmp_path, device="cpu", quantize="int8")
    assert all(type(x) is CpuLinear and x.kind == "int8" for x in linears(int8))


@pytest.mark.parametrize("n_threads", [2, 4])
@pytest.mark.parametrize("choice", [PACKED, SPLIT], ids=["packed", "split"])
def test_greedy_tokens_match_transformers_with_fast_products(tmp_path, threads, n_threads, choice):
    threads(n_threads)
    hf = make_hf_checkpoint(tmp_path, seed=3, num_key_value_heads=2)
    ours = use_cpu_kernels(load_model(tmp_path, device="cpu", dtype="float32", pack=False), choose=fixed(choice))
    assert ours.lm_head.choice == choice
    prompts = [[5, 9, 33, 70, 2, 11, 4], [8, 41, 6]]
    for prompt in prompts:
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert generate_tokens(ours, [prompt], 24).tokens[0] == want
    # and as one batch of unequal prompts, each row at its own position, as generate runs several
    assert generate_tokens(ours, prompts, 24).tokens == [generate_tokens(ours, [p], 24).tokens[0] for p in prompts]


def test_compiled_decode_gives_the_eager_tokens(tmp_path):
    make_hf_checkpoint(tmp_path, seed=4, num_key_value_heads=2)
    eager = load_model(tmp_path, device="cpu", dtype="float32")
    compiled = load(tmp_path, device="cpu", dtype="float32", compile=True)
    prompts = [[5, 9, 33, 70, 2, 11, 4], [8, 41, 6]]  # unequal: each row its own slot and mask
    want = generate_tokens(eager, prompts, 20).tokens
    first = generate_tokens(compiled.model, prompts, 20, step=compiled.step)
    assert first.tokens == want
    assert first.stats.compile_s > 0
    graphs = counters["stats"]["unique_graphs"]
    again = generate_tokens(compiled.model, prompts, 20, step=compiled.step)
    assert again.tokens == want
    assert counters["stats"]["unique_graphs"] == graphs  # the same shapes: compiled once
    assert generate_tokens(compiled.model, prompts[:1], 20, step=compiled.step).tokens[0] == want[0]


def test_compiled_decode_with_a_sliding_window_gives_the_eager_tokens(tmp_path):
    """The compiled step attends over a power-of-two span of the cache: keys past a layer's
    window are masked."""
    make_hf_checkpoint(tmp_path, seed=5, family="mistral", num_key_value_heads=2, sliding_window=4)
    eager = load_model(tmp_path, device="cpu", dtype="float32")
    compiled = load(tmp_path, device="cpu", dtype="float32", compile=True)
    prompts = [[5, 9, 33, 70, 2, 11, 4], [8, 41, 6]]  # past the window, rows at their own slots
    want = generate_tokens(eager, prompts, 20).tokens
    assert generate_tokens(compiled.model, prompts, 20, step=compiled.step).tokens == want


def test_cuda_graph_mode_of_the_compiled_step_runs_on_the_cpu_too(tmp_path):
    """CUDA compiles the step with mode="reduce-overhead" (CUDA graphs); CI has no GPU, so the same
    call runs here, where inductor compiles it without graphs and must give the eager tokens."""
    make_hf_checkpoint(tmp_path, seed=5, num_key_value_heads=4)
    model = load_model(tmp_path, device="cpu", dtype="float32", pack=False)  # CUDA's weights are plain
    want = generate_tokens(model, [[3, 14, 15, 92, 6]], 12).tokens
    step = compile_decode(model, mode="reduce-overhead")
    assert generate_tokens(model, [[3, 14, 15, 92, 6]], 12, step=step).tokens == want


def test_a_packed_model_compiles_with_its_products_left_to_onednn(tmp_path):
    """oneDNN's product is one custom op to torch.compile (its fake tensors hide the packed layout)."""
    make_hf_checkpoint(tmp_path, seed=8, num_key_value_heads=2)
    model = use_cpu_kernels(load_model(tmp_path, device="cpu", dtype="float32", pack=False), choose=fixed(PACKED))
    want = generate_tokens(model, [[3, 14, 15, 92, 6], [7, 7]], 12).tokens
    step = compile_decode(model)
    assert generate_tokens(model, [[3, 14, 15, 92, 6], [7, 7]], 12, step=step).tokens == want


def test_compile_without_a_cpp_compiler_is_one_clear_error(tmp_path):
    """inductor's CPU kernels need $CXX; on a GPU machine --device auto would compile for CUDA,
    whose Triton launchers use $CC instead (tests/test_cuda.py covers that case)."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "xllama_cli", "generate", "--device", "cpu", "-n", "4", "--compile",
                          "Once"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2
    err = run.stderr.strip().splitlines()[-1]
    assert err.startswith("error: --compile failed (") and "run without --compile" in err
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("n_kv", [8, 2, 1])
def test_decode_attention_equals_sdpa(n_kv):
    from xllama_cli.attention import decode_attention

    g = torch.Generator().manual_seed(n_kv)
    q = torch.randn(3, 8, 1, 16, generator=g)
    k, v = torch.randn(3, n_kv, 40, 16, generator=g), torch.randn(3, n_kv, 40, 16, generator=g)
    mask = torch.rand(3, 1, 1, 40, generator=g) > 0.3
    mask[..., 0] = True  # every row attends to something, as the model's masks guarantee
    for m in (None, mask, mask[:1]):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=n_kv != 8)
        assert torch.allclose(decode_attention(q, k, v, m), want, rtol=1e-5, atol=1e-6)
        got = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), m)
        assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, atol=3e-2)


def test_many_row_products_keep_their_gradient_for_training():
    """Prefill-sized products go to oneDNN at inference only: its op has no backward."""
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(SMALL_ROWS + 1, 32)
    matmul(x, w).sum().backward()
    assert torch.allclose(w.grad, x.sum(0).expand(64, 32), rtol=1e-5, atol=1e-5)


# ---- private ops: tried once, checked against F.linear, not used when missing or wrong ----
@pytest.fixture
def fresh_probes(monkeypatch):
    """Every private op tried anew in this test (a process keeps each answer once it has it)."""
    monkeypatch.setattr(linear, "_PROBES", {})


def test_a_onednn_op_that_gives_wrong_values_is_not_used(tmp_path, fresh_probes, monkeypatch):
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: real(*args) + 1)
    assert not linear.onednn_works(torch.float32)
    make_hf_checkpoint(tmp_path, seed=6, num_key_value_heads=2)
    model = load_model(tmp_path, device="cpu", dtype="float32", decode_batch=8)
    used = [x.choice for x in model.modules() if isinstance(x, CpuLinear)]
    assert used and not any("onednn" in (c.layout, c.few, c.many) for c in used)
    plain = load_model(tmp_path, device="cpu", dtype="float32", pack=False)
    tokens = torch.tensor([list(range(3, 3 + SMALL_ROWS + 4))])  # a prefill
    with torch.no_grad():
        assert torch.allclose(model(tokens), plain(tokens), rtol=1e-5, atol=1e-5)


def test_a_onednn_op_that_fails_is_not_used(fresh_probes, monkeypatch):
    def missing(*_args):
        raise RuntimeError("No such operator mkldnn::_reorder_linear_weight")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)
    assert not linear.onednn_works(torch.float32) and not linear.onednn_works(torch.bfloat16)
    model = use_cpu_kernels(nn.Sequential(nn.Linear(32, 64)), Tuner(decode_rows=8))
    assert type(model[0]) is CpuLinear and model[0].choice.layout != "onednn"


def test_bfloat16_onednn_is_not_tried_where_onednn_only_emulates_it(fresh_probes, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not linear.onednn_works(torch.bfloat16)


def test_each_private_op_is_tried_once_per_process(fresh_probes, monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(1) or real(*args))
    first = linear.onednn_works(torch.float32)
    tried = len(calls)
    assert tried > 0
    assert linear.onednn_works(torch.float32) == first and len(calls) == tried
