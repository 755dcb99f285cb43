"""Weight-only int8: the quantization step, the int8 products, the quantized model and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, cli_fails, fixture, make_hf_checkpoint
from xllama_cli import load_model
from xllama_cli.cli import DEMO_MODEL
from xllama_cli.evaluate import evaluate_text
from xllama_cli.generation import generate_tokens
from xllama_cli.linear import SMALL_ROWS
from xllama_cli.quantize import Int8Linear, int8_matmul, quantize_int8
from xllama_cli.tokenizer import load_tokenizer


def test_dequantised_weights_are_within_one_quantization_step():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    assert q.abs().max() <= 127
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(64) != 5], torch.full((63,), 127, dtype=torch.int8))
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] * 0.5 + 1e-7).all()  # rounding: at most half a step
    assert torch.equal(q[5], torch.zeros(48, dtype=torch.int8))


@pytest.mark.parametrize("k", [64, 172])  # 172: no multiple of 16, which ATen's int8 kernel mishandles
@pytest.mark.parametrize("rows", [1, 5, SMALL_ROWS, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_product_equals_the_dequantised_product(rows, dtype, k):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, k, generator=g)
    q, scales = quantize_int8(w)
    x = torch.randn(2, rows, k, generator=g).to(dtype)
    want = F.linear(x.float(), q.float() * scales[:, None])
    got = int8_matmul(x, q, scales.to(dtype))
    assert got.dtype == dtype and got.shape == (2, rows, 96)
    assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_quantized_model_replaces_every_projection_and_the_head(tmp_path):
    make_hf_checkpoint(tmp_path, seed=1, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True)
    m = load_model(tmp_path, device="cpu", quantize="int8")
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(isinstance(mod, Int8Linear) for mod in linears)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16  # a lookup table: left as it is
    assert m.lm_head.weight.dtype == torch.int8  # the tied head gets its own int8 copy
    assert m.model.layers[0].self_attn.q_proj.bias is not None
    out = generate_tokens(m, [[5, 9, 33], [8]], 12)
    assert [len(t) for t in out.tokens] == [12, 12]


def test_int8_greedy_tokens_follow_the_unquantized_model(story_hf):
    tok = load_tokenizer(story_hf)
    prompt = [tok.encode("Once upon a time, there was a little")]
    full = generate_tokens(load_model(story_hf, device="cpu", dtype="bfloat16"), prompt, 24).tokens[0]
    int8 = generate_tokens(load_model(story_hf, device="cpu", quantize="int8"), prompt, 24).tokens[0]
    assert int8[:8] == full[:8]  # a trained model's clear choices survive the rounding


@pytest.mark.parametrize("model", ["demo", "stories260K-hf"])
def test_int8_perplexity_within_one_percent_of_the_unquantized_model(model):
    path = DEMO_MODEL if model == "demo" else fixture(model)
    text = DEMO_MODEL / "heldout.txt" if model == "demo" else ROOT / "benchmarks/data/heldout_stories.txt"
    tok = load_tokenizer(path)
    ppl = {q: evaluate_text(load_model(path, device="cpu", dtype="float32" if q is None else "auto", quantize=q),
                            tok, text, 256, 255, progress=False).perplexity for q in (None, "int8")}
    assert abs(ppl["int8"] / ppl[None] - 1) < 0.01, ppl


def test_cli_eval_and_generate_with_int8():
    run = subprocess.run([sys.executable, "-m", "xllama_cli", "eval", "--quantize", "int8", "--json",
                          "--text", str(DEMO_MODEL / "heldout.txt"), "--context", "128"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert 20 < json.loads(run.stdout)["perplexity"] < 60
    run = subprocess.run([sys.executable, "-m", "xllama_cli", "generate", "--quantize", "int8", "-n", "8",
                          "--temperature", "0", "Once upon a time"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Once upon a time") and len(run.stdout) > len("Once upon a time") + 8


def test_cli_refuses_unknown_method_and_float32_compute():
    cli_fails(["generate", "--model", str(DEMO_MODEL), "--quantize", "int4", "hi"], "unknown --quantize 'int4'")
    cli_fails(["eval", "--model", str(DEMO_MODEL), "--quantize", "int8", "--dtype", "float32",
               "--text", str(DEMO_MODEL / "heldout.txt")],
              "--quantize int8 computes in bfloat16 or float16")


@pytest.mark.parametrize("broken", ["wrong", "missing"])
def test_an_int8_kernel_that_is_wrong_or_missing_is_not_used(monkeypatch, broken):
    from xllama_cli import linear
    from xllama_cli.quantize import int8_kernel_works

    monkeypatch.setattr(linear, "_PROBES", {})  # tried anew here
    if broken == "wrong":
        monkeypatch.setattr(torch, "_weight_int8pack_mm",
                            lambda x, w, s: torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype))
    else:
        monkeypatch.delattr(torch, "_weight_int8pack_mm")
    assert not int8_kernel_works(torch.bfloat16)
    q, scales = quantize_int8(torch.randn(96, 64))
    x, s = torch.randn(1, 64).bfloat16(), scales.bfloat16()
    assert torch.equal(int8_matmul(x, q, s), F.linear(x, q.bfloat16()) * s)  # widened instead
