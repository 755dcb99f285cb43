"""CUDA paths (skipped without a GPU; benchmarks/cuda_check.sh runs them where one is lent):
tokens against transformers, the compiled step with CUDA graphs, int8 on the GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_checkpoint
from xllama_cli import load_model
from xllama_cli.loading import load
from xllama_cli.cli import DEMO_MODEL
from xllama_cli.evaluate import evaluate_text
from xllama_cli.generation import generate_tokens
from xllama_cli.quantize import int8_matmul, quantize_int8
from xllama_cli.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[5, 9, 33, 70, 2, 11, 4], [8, 41, 6]]
# (family, overrides): the windows are shorter than the prompts, so every mask path meets them
FAMILIES = {"llama": ("llama", {}), "mistral-window": ("mistral", dict(sliding_window=4)),
            "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1))}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_greedy_tokens_on_cuda_match_transformers(tmp_path, family):
    kind, overrides = FAMILIES[family]
    hf = make_hf_checkpoint(tmp_path, seed=3, num_key_value_heads=2, family=kind, **overrides)
    ours = load_model(tmp_path, device="cuda", dtype="float32")
    for prompt in PROMPTS:
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert generate_tokens(ours, [prompt], 24).tokens[0] == want


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_step_with_cuda_graphs_gives_the_eager_tokens(tmp_path, dtype, family):
    kind, overrides = FAMILIES[family]
    make_hf_checkpoint(tmp_path, seed=4, num_key_value_heads=2, family=kind, **overrides)
    eager = load_model(tmp_path, device="cuda", dtype=dtype)
    compiled = load(tmp_path, device="cuda", dtype=dtype, compile=True)
    want = generate_tokens(eager, PROMPTS, 20).tokens
    first = generate_tokens(compiled.model, PROMPTS, 20, step=compiled.step)
    assert first.stats.compile_s > 0
    assert first.tokens == want
    assert generate_tokens(compiled.model, PROMPTS, 20, step=compiled.step).tokens == want  # replayed graphs


def test_int8_product_on_cuda_equals_the_dequantised_product():
    w = torch.randn(256, 512, device="cuda")
    q, scales = quantize_int8(w)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ (q.float() * scales[:, None]).t()
    got = int8_matmul(x, q, scales.bfloat16()).float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_int8_perplexity_on_cuda_within_one_percent():
    tok = load_tokenizer(DEMO_MODEL)
    text = DEMO_MODEL / "heldout.txt"
    base = evaluate_text(load_model(DEMO_MODEL, device="cuda", dtype="float32"), tok, text, 256, 255, progress=False)
    int8 = evaluate_text(load_model(DEMO_MODEL, device="cuda", quantize="int8"), tok, text, 256, 255, progress=False)
    assert abs(int8.perplexity / base.perplexity - 1) < 0.01
