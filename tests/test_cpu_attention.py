"""cpu_attention.py: a decode step's RoPE, cache write and attention as one numba loop. It gives the
plain path's logits and cache (batched rows at one slot or each at its own), refuses a slot the cache
lacks before writing anything, leaves sliding-window layers to the plain path, and is given only where
it agrees with the plain path and was measured faster, its times kept."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_llama, rows_at_their_own_slots
from xllama_cli import cpu_attention
from xllama_cli.config import ModelConfig
from xllama_cli.cpu_attention import give_fused_step, use_fused_attention
from xllama_cli.fuse import fuse_projections
from xllama_cli.linear import MemoryStore, Tuner
from xllama_cli.model import Transformer

if cpu_attention._loop() is None:
    pytest.skip("numba is not usable here", allow_module_level=True)


def small_model(**changes) -> Transformer:
    """A random float32 GQA model (4 query heads over 2 K/V heads) with q, k and v stacked."""
    return fuse_projections(random_llama(**{"hidden_dim": 96, **changes}))


def twins(**changes) -> tuple[Transformer, Transformer]:
    """The same model twice: the plain path's, and one with the fused step."""
    plain = small_model(**changes)
    fused = copy.deepcopy(plain)
    assert give_fused_step(fused) == fused.config.n_layers
    return plain, fused


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


QWEN2 = dict(family="qwen2", qkv_bias=True)  # q, k and v with biases


@torch.inference_mode()
@pytest.mark.parametrize("rows,family", [(1, {}), (3, {}), (2, QWEN2)])
def test_the_fused_step_gives_the_plain_paths_logits_and_cache(rows, family):
    plain, fused = twins(**family)
    tokens = torch.randint(0, 96, (rows, 12), generator=torch.Generator().manual_seed(1))
    for model in (plain, fused):
        model.setup_cache(rows, 32)
        model(tokens[:, :5], 0)  # the prompt: the plain path in both
    for t in range(5, 12):
        want, got = plain(tokens[:, t:t + 1], t), fused(tokens[:, t:t + 1], t)
        assert close(got, want), (t, (got - want).abs().max())
    for a, b in zip(plain.model.layers, fused.model.layers):
        assert close(b.self_attn.kv_cache.k, a.self_attn.kv_cache.k, 1e-6)
        assert close(b.self_attn.kv_cache.v, a.self_attn.kv_cache.v, 1e-6)


@torch.inference_mode()
def test_rows_each_at_their_own_slot_decode_as_the_plain_paths_masked_step():
    """The engine's step: rows of a bigger cache (from `row`), each at its own slot (a tensor
    start) over `span` slots, each attending only to the slots it filled."""
    plain, fused = twins()
    for got, want in rows_at_their_own_slots(plain, fused, vocab=96):
        assert close(got, want), (got - want).abs().max()
    for a, b in zip(plain.model.layers, fused.model.layers):
        assert close(b.self_attn.kv_cache.k, a.self_attn.kv_cache.k, 1e-6)


@torch.inference_mode()
def test_a_slot_outside_the_cache_is_refused_before_anything_is_written():
    _, fused = twins()
    fused.setup_cache(1, 8)
    fused(torch.tensor([[1, 2, 3]]), 0)
    before = [layer.self_attn.kv_cache.k.clone() for layer in fused.model.layers]
    with pytest.raises(IndexError, match="not in a cache of 1 rows and 8 slots"):
        fused(torch.tensor([[4]]), 8)
    with pytest.raises(IndexError):
        fused(torch.tensor([[4], [5]]), torch.tensor([3, 9]), span=8)  # one row out of range
    assert all(torch.equal(layer.self_attn.kv_cache.k, k) for layer, k in zip(fused.model.layers, before))


def test_sliding_window_layers_keep_the_plain_path():
    model = small_model(family="qwen2", qkv_bias=True, n_layers=3, sliding_window=4, window_layers=[True, False, True])
    assert give_fused_step(model) == 1
    assert [layer.self_attn.fused_step is not None for layer in model.model.layers] == [False, True, False]


def test_an_unstacked_or_half_precision_model_is_not_given_it():
    model = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96,
                                    hidden_dim=96, max_seq_len=64))
    assert give_fused_step(model) == 0  # q, k and v not stacked
    half = small_model().to(torch.bfloat16)
    assert give_fused_step(half) == 0  # a bfloat16 cache
    assert not use_fused_attention(half, Tuner(MemoryStore(), 1))


@torch.inference_mode()
def test_it_is_given_where_measured_faster_and_its_times_are_kept(monkeypatch):
    store = MemoryStore()
    model = small_model()
    use_fused_attention(model, Tuner(store, 1))
    (key, entry), = store.entries.items()
    assert key.startswith("attention 4x16 heads 2 kv rows 1 ")
    times = entry["times"]["attention"]["few"]
    assert set(times) == {"plain", "fused"} and all(t > 0 for t in times.values())

    def untimed(paths):
        raise AssertionError("timed again, though the store keeps its times")

    monkeypatch.setattr(cpu_attention, "time_paths", untimed)
    for fused, plain, given in ((1.0, 2.0, True), (2.0, 1.0, False)):
        store.put(key, {"times": {"attention": {"few": {"plain": plain, "fused": fused}}}})
        model = small_model()
        assert use_fused_attention(model, Tuner(store, 1)) is given
        assert all((layer.self_attn.fused_step is not None) is given for layer in model.model.layers)


@torch.inference_mode()
def test_a_loop_that_disagrees_with_the_plain_path_is_not_given(monkeypatch):
    loop = cpu_attention._loop()

    def wrong(qkv, cos, sin, k, v, row, pos, out):
        done = loop(qkv, cos, sin, k, v, row, pos, out)
        out *= 1.01
        return done

    monkeypatch.setattr(cpu_attention, "_loop", lambda: wrong)
    store = MemoryStore()
    assert not use_fused_attention(small_model(), Tuner(store, 1))
    assert not store.entries  # nothing timed
