"""Properties of K/V pooling over random head and group counts (hypothesis)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from xllama_cli.config import ModelConfig
from xllama_cli.errors import XllamaError
from xllama_cli.build import expected_shapes
from xllama_cli.convert import convert_checkpoint
from xllama_cli.layout import regroup_kv, target_kv_heads, valid_groups


@st.composite
def layouts(draw):
    """(n_heads, n_kv, G, head_dim, dim): n_kv divides n_heads, G divides n_kv (pooling down)."""
    n_kv = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]))
    n_heads = n_kv * draw(st.integers(1, 4))
    groups = draw(st.sampled_from([d for d in range(1, n_kv + 1) if n_kv % d == 0]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    dim = draw(st.integers(1, 12))
    return n_heads, n_kv, groups, head_dim, dim


@settings(max_examples=150, deadline=None)
@given(layouts(), st.booleans(), st.integers(0, 2**31 - 1))
def test_pooling_then_repeating_gives_each_head_its_groups_mean(layout, is_bias, seed):
    n_heads, n_kv, groups, head_dim, dim = layout
    shape = (n_kv * head_dim,) if is_bias else (n_kv * head_dim, dim)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    pooled = regroup_kv(w, n_kv, groups)
    assert pooled.shape == (groups * head_dim, *shape[1:]) and pooled.dtype == w.dtype
    back = regroup_kv(pooled, groups, n_kv)
    assert back.shape == w.shape
    size = n_kv // groups
    heads = w.reshape(n_kv, head_dim, *shape[1:])
    for h in range(n_kv):  # head h belongs to the contiguous group h // size
        g = h // size
        want = heads[g * size:(g + 1) * size].double().mean(0)
        torch.testing.assert_close(back.reshape(n_kv, head_dim, *shape[1:])[h].double(), want,
                                   rtol=1e-6, atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 64))
def test_group_flags_and_valid_counts_agree(n_heads, n_kv, groups):
    """--groups G is accepted exactly when G is a valid count, and then means G KV heads."""
    if n_heads % n_kv:
        return
    valid = valid_groups(n_heads, n_kv)
    try:
        got = target_kv_heads(n_heads, n_kv, "GQA", groups)
    except XllamaError:
        assert groups not in valid
    else:
        assert groups in valid and got == groups and n_heads % got == 0
    assert target_kv_heads(n_heads, n_kv, "MQA", None) == 1
    assert target_kv_heads(n_heads, n_kv, "MHA", None) == n_heads
    assert target_kv_heads(n_heads, n_kv, None, None) == n_kv


@settings(max_examples=12, deadline=None)
@given(layouts(), st.integers(0, 2**31 - 1))
def test_converted_checkpoint_config_and_shapes_are_consistent(layout, seed):
    """Through `convert` itself: config.json's head counts, every tensor's shape and the pooled values."""
    n_heads, n_kv, groups, head_dim, _ = layout
    cfg = ModelConfig(dim=8, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=16, hidden_dim=12,
                      head_dim=head_dim, max_seq_len=32)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) for k, s in expected_shapes(cfg).items()}
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "src", Path(d) / "out"
        src.mkdir()
        (src / "config.json").write_text(json.dumps(cfg.to_hf()))
        save_file(state, src / "model.safetensors", metadata={"format": "pt"})
        convert_checkpoint(src, out, groups=groups, shard_size="1KB", progress=False)
        hf = json.loads((out / "config.json").read_text())
        assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]) == (n_heads, groups, head_dim)
        got = {}
        for f in out.glob("*.safetensors"):
            got.update(load_file(f))
        want_shapes = expected_shapes(cfg.replace(n_kv_heads=groups))
        assert {k: tuple(v.shape) for k, v in got.items()} == want_shapes
        for k, v in state.items():
            if ".k_proj." in k or ".v_proj." in k:
                want = v.view(groups, n_kv // groups, head_dim, -1).double().mean(1).reshape(v.shape[0] * groups // n_kv, -1)
                torch.testing.assert_close(got[k].double(), want, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(got[k], v), k
