"""One product for q, k and v and one for gate and up (fuse.py): the logits of the unfused model and
of transformers, state_dict() keys and memory as the plain model's, quantized layers stacked
exactly, layers that differ left apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_hf_checkpoint
from xllama_cli import load_model
from xllama_cli.fuse import Part, Stacked, fuse_projections, stack
from xllama_cli.generation import generate_tokens
from xllama_cli.linear import CpuLinear
from xllama_cli.quantize import Int4Linear, Int8Linear

PROMPT = [[5, 9, 33, 70, 2, 11, 4, 17, 23, 99, 41, 8]]


def logits(model: nn.Module, tokens=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(tokens)).float()


@pytest.mark.parametrize("family,overrides", [("llama", {"num_key_value_heads": 2}),
                                              ("qwen2", {}),  # q, k and v biases
                                              ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_fused_blocks_give_the_logits_of_transformers(tmp_path, family, overrides):
    hf = make_hf_checkpoint(tmp_path, seed=3, family=family, **overrides)
    plain = load_model(tmp_path, device="cpu", dtype="float32", pack=False)
    fused = fuse_projections(load_model(tmp_path, device="cpu", dtype="float32", pack=False))
    for block in fused.model.layers:
        assert isinstance(block.self_attn.qkv, Stacked) and isinstance(block.mlp.gate_up, Stacked)
        assert isinstance(block.self_attn.q_proj, Part) and isinstance(block.mlp.up_proj, Part)
    with torch.no_grad():
        want = hf(torch.tensor(PROMPT)).logits
    torch.testing.assert_close(logits(fused), want, rtol=1e-5, atol=1e-5)
    again = fuse_projections(fused)  # a second time changes nothing
    torch.testing.assert_close(logits(again), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(fused), logits(plain), rtol=1e-5, atol=1e-5)
    assert generate_tokens(fused, PROMPT, 8).tokens == generate_tokens(plain, PROMPT, 8).tokens


def test_the_default_cpu_path_fuses_and_keeps_the_plain_keys_and_memory(tmp_path):
    make_hf_checkpoint(tmp_path, seed=4, num_key_value_heads=2, attention_bias=True)
    plain = load_model(tmp_path, device="cpu", dtype="float32", pack=False)
    model = load_model(tmp_path, device="cpu", dtype="float32")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv.layer, CpuLinear) and isinstance(model.model.layers[0].mlp.gate_up.layer, CpuLinear)
    assert list(model.state_dict()) == list(plain.state_dict())

    def nbytes(m: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    assert nbytes(model) <= nbytes(plain)
    # a part still computes its own layer's output
    x = torch.randn(1, 2, attn.q_proj.in_features)
    with torch.no_grad():
        torch.testing.assert_close(attn.k_proj(x), plain.model.layers[0].self_attn.k_proj(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda lin: Int8Linear(lin, torch.bfloat16), lambda lin: Int4Linear(lin, torch.bfloat16)],
                         ids=["int8", "int4"])
def test_quantized_layers_stack_into_the_products_of_each(make):
    torch.manual_seed(0)
    layers = [make(nn.Linear(64, n, bias=False)) for n in (32, 16, 48)]
    one = stack(layers)
    assert type(one) is type(layers[0]) and one.out_features == 96
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        assert torch.equal(one(x), torch.cat([layer(x) for layer in layers], -1))


def test_layers_that_differ_are_not_stacked():
    torch.manual_seed(0)
    assert stack([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)]) is None
    assert stack([nn.Linear(8, 4), nn.Linear(6, 4)]) is None
    assert stack([nn.Linear(8, 4), Int8Linear(nn.Linear(8, 4), torch.bfloat16)]) is None
    assert stack([nn.Linear(8, 4), nn.Linear(8, 4).bfloat16()]) is None


def test_fused_attention_gives_q_and_k_as_one_output_and_decodes_as_the_plain_block(tmp_path):
    # RoPE turns q and k in one go; through the cache, a prefill then a decode step
    make_hf_checkpoint(tmp_path, seed=5, num_key_value_heads=2)
    plain = load_model(tmp_path, device="cpu", dtype="float32", pack=False)
    fused = fuse_projections(load_model(tmp_path, device="cpu", dtype="float32", pack=False))
    attn = fused.model.layers[0].self_attn
    q, k, v = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
    assert attn.qkv.sizes == [q + k, v] and (attn.q_proj.start, attn.k_proj.start, attn.v_proj.start) == (0, q, q + k)
    for model in (plain, fused):
        model.setup_cache(1, 32)
    with torch.no_grad():
        for start, tokens in ((0, PROMPT), (len(PROMPT[0]), [[7]])):
            torch.testing.assert_close(fused(torch.tensor(tokens), start), plain(torch.tensor(tokens), start),
                                       rtol=1e-5, atol=1e-5)
