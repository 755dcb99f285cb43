"""The shared paths from a checkpoint to a model: named architectures (ModelConfig.from_name), the
checked tensor stream loading and convert share, build_model behind every model, and a checkpoint
opened once and handed to each reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xllama_cli import bench
from xllama_cli.checkpoint import open_checkpoint
from xllama_cli.config import ARCHITECTURES, ModelConfig
from xllama_cli.convert import convert_checkpoint
from xllama_cli.errors import XllamaError
from xllama_cli.build import build_model, expected_shapes
from xllama_cli.loading import load_model
from xllama_cli.tokenizer import load_tokenizer
from xllama_cli.writer import write_safetensors

from conftest import ROOT, benchmark, fixture

TINY = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=128, hidden_dim=96, max_seq_len=64)
TOKENS = torch.tensor([[1, 5, 9, 3, 77, 2]])


def save(folder: Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", {k: v.contiguous() for k, v in state.items()})
    (folder / "config.json").write_text(json.dumps(cfg.to_hf()))
    return folder


def saved_random(folder: Path, **changes) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = ModelConfig(**{**TINY, **changes})
    state = bench.random_model(cfg, torch.device("cpu"), torch.float32, seed=1).state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    save(folder, cfg, state)
    return cfg, state


# ---- named architectures ----
def test_an_unknown_architecture_is_one_error_line_naming_every_known_one():
    with pytest.raises(XllamaError) as e:
        ModelConfig.from_name("llama9")
    message = str(e.value)
    assert "\n" not in message and "'llama9'" in message
    for name in ARCHITECTURES:
        assert name in message


def test_each_named_architecture_is_a_fresh_config():
    a = ModelConfig.from_name("llama3-8b")
    a.eos_id.append(7)
    assert ModelConfig.from_name("llama3-8b").eos_id == [128001]


def test_the_demo_architecture_is_the_built_in_demo_models():
    shipped = json.loads((ROOT / "src" / "xllama_cli" / "demo" / "config.json").read_text())
    assert ModelConfig.from_name("demo") == ModelConfig.from_hf(shipped)


def test_the_decode_benchmark_builds_its_named_architecture_by_default():
    module = benchmark("decode")
    cfg = module.random_config(module.parse_args([]))
    assert cfg == ModelConfig.from_name("bench-220m")


# ---- one build for every model ----
@pytest.mark.parametrize("tied", [False, True])
def test_a_random_model_saved_and_loaded_is_the_same_model(tmp_path, tied):
    """bench's random model and load_model build through the same build_model: the same tensors
    give the same model (tied head, RoPE, eval mode, no gradients)."""
    cfg, state = saved_random(tmp_path, tie_embeddings=tied)
    ours = bench.random_model(cfg, torch.device("cpu"), torch.float32, seed=1)
    loaded = load_model(tmp_path, device="cpu", dtype="float32", pack=False)
    for m in (ours, loaded):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied
    assert loaded.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(t, ours.state_dict()[k]) for k, t in loaded.state_dict().items())
    assert torch.equal(loaded(TOKENS), ours(TOKENS))


def test_regrouping_to_the_bases_own_layout_gives_the_base(tmp_path):
    base = bench.random_model(ModelConfig(**TINY), torch.device("cpu"), torch.float32, seed=2)
    same = bench.regrouped(base, base.config.n_kv_heads)
    assert same is not base and torch.equal(same(TOKENS), base(TOKENS))


def test_build_model_refuses_tensors_that_leave_a_part_of_the_model_unset():
    cfg = ModelConfig(**TINY)
    state = {k: torch.zeros(s) for k, s in expected_shapes(cfg).items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="model.norm.weight"):
        build_model(cfg, state, "cpu", torch.float32)


# ---- one checked stream for loading and convert ----
def _both_fail(folder: Path, out: Path) -> tuple[str, str]:
    with pytest.raises(XllamaError) as loading:
        load_model(folder, device="cpu", pack=False)
    with pytest.raises(XllamaError) as converting:
        convert_checkpoint(folder, out, progress=False)
    assert not out.exists()
    return str(loading.value), str(converting.value)


@pytest.mark.parametrize("damage,needle", [
    (lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2, 2)}), "unexpected tensor"),
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "weights lack 1 tensors"),
    (lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)}), "has shape (95, 64)"),
    (lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(56, 64)}), "has 56 rows"),
])
def test_loading_and_convert_refuse_a_bad_checkpoint_with_the_same_message(tmp_path, damage, needle):
    cfg, state = saved_random(tmp_path / "src")
    damage(state)
    save(tmp_path / "src", cfg, state)
    loading, converting = _both_fail(tmp_path / "src", tmp_path / "out")
    assert loading == converting and needle in loading and "\n" not in loading


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.rotary_emb.inv_freq", "lm_head.weight"])
def test_loading_and_convert_skip_derived_tensors_alike(tmp_path, name):
    """RoPE frequencies and the head of a tied model are derived: both readers skip them."""
    cfg, state = saved_random(tmp_path / "src", tie_embeddings=True)
    state[name] = torch.ones(4) if "inv_freq" in name else state["model.embed_tokens.weight"] * 2
    save(tmp_path / "src", cfg, state)
    convert_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    from_src = load_model(tmp_path / "src", device="cpu", dtype="float32", pack=False)
    from_out = load_model(tmp_path / "out", device="cpu", dtype="float32", pack=False)
    assert torch.equal(from_src(TOKENS), from_out(TOKENS))
    assert torch.equal(from_src.lm_head.weight, state["model.embed_tokens.weight"])


# ---- a checkpoint opened once ----
def test_an_opened_checkpoint_serves_every_reader_as_its_folder_does(tmp_path):
    story = fixture("stories260K-hf")
    ckpt = open_checkpoint(story)
    assert open_checkpoint(ckpt) is ckpt
    by_path = load_model(story, device="cpu", dtype="float32", groups=2)
    by_ckpt = load_model(ckpt, device="cpu", dtype="float32", groups=2)
    assert torch.equal(by_path(TOKENS), by_ckpt(TOKENS))
    assert load_tokenizer(ckpt).encode("Once upon a time") == load_tokenizer(story).encode("Once upon a time")
    a = convert_checkpoint(story, tmp_path / "a", groups=2, progress=False)
    b = convert_checkpoint(ckpt, tmp_path / "b", groups=2, progress=False)
    assert a.files == b.files
