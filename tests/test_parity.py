"""xllama's model against transformers' LlamaForCausalLM: logits and greedy generations."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_checkpoint
from xllama_cli import load_model
from xllama_cli.generation import generate_tokens
from xllama_cli.linear import Choice, fixed, use_cpu_kernels

CASES = {
    "mha": dict(num_key_value_heads=8),
    "gqa4": dict(num_key_value_heads=4),
    "gqa2": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "head_dim": dict(num_key_value_heads=2, head_dim=16),
    "bias": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "theta": dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "linear": dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "dynamic": dict(num_key_value_heads=2, max_position_embeddings=16,
                    rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}),
    "llama3": dict(num_key_value_heads=2, max_position_embeddings=64,
                   rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                    "rope_theta": 10000.0}),
    # Llama 3.2's release: factor 32, theta 500000, tied head
    "llama3.2": dict(num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                      "rope_theta": 500000.0}),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(path, seed=len(request.param), **CASES[request.param])
    ours = load_model(path, device="cpu", dtype="float32")
    return request.param, hf, ours, path


def test_full_sequence_logits_match_transformers(pair):
    name, hf, ours, _ = pair
    # 40 tokens: past max_position_embeddings for the dynamic case (16), so its scaling is active
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == want.shape == (2, 40, 128)
    assert (got - want).abs().max().item() < 1e-4, name


def test_logits_and_greedy_tokens_match_transformers_with_packed_weights(pair):
    """float32 weights packed for oneDNN (where the CPU measures that fastest) must agree with the
    reference just as closely."""
    name, hf, _, path = pair
    packed = use_cpu_kernels(load_model(path, device="cpu", dtype="float32", pack=False),
                             choose=fixed(Choice("onednn", "onednn", "onednn")))
    assert packed.model.layers[0].mlp.down_proj.choice.layout == "onednn"
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        assert (packed(tokens) - want).abs().max().item() < 1e-4, name
        greedy = hf.generate(tokens[:, :7], max_new_tokens=24, min_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[:, 7:].tolist()
    assert generate_tokens(packed, tokens[:, :7].tolist(), 24).tokens == greedy, name


def test_greedy_generation_with_cache_matches_transformers(pair):
    name, hf, ours, _ = pair
    prompt = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    got = generate_tokens(ours, [prompt[0].tolist()], 32).tokens[0]
    assert got == want, name


def test_rope_override_matches_transformers_configured_the_same(tmp_path):
    """--rope dynamic --rope-factor 2 on a plain checkpoint equals transformers built with that scaling."""
    from transformers import LlamaForCausalLM

    hf = make_hf_checkpoint(tmp_path, max_position_embeddings=16, num_key_value_heads=2)
    cfg = hf.config
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    scaled = LlamaForCausalLM(cfg).eval()
    scaled.load_state_dict(hf.state_dict())
    ours = load_model(tmp_path, rope="dynamic", rope_factor=2.0, device="cpu")
    tokens = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(tokens) - scaled(tokens).logits).abs().max().item() < 1e-4
