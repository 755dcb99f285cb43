"""`xllama uptrain` and the built-in demo model, through the CLI."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import make_hf_checkpoint
from xllama_cli.cli import DEMO_MODEL, app

runner = CliRunner()
TEXT = "\n\n".join(
    f"The {a} {b} went to the {c} and found a {d}." for a in ("little", "old", "brave", "poor")
    for b in ("king", "girl", "fox", "miller") for c in ("forest", "castle", "well") for d in ("ring", "bird"))


def make_source(tmp_path):
    src = tmp_path / "src"
    make_hf_checkpoint(src, tokenizer=True, vocab_size=512, num_key_value_heads=2, hidden_size=32,
                       intermediate_size=48, num_attention_heads=4, max_position_embeddings=64)
    (tmp_path / "text.txt").write_text(TEXT)
    return src


def uptrain(*args: str, env=None):
    return runner.invoke(app, ["uptrain", "--batch", "2", "--context", "16", "--lr", "1e-3",
                               "--dtype", "float32", *args], env=env)


def test_uptrain_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    src = make_source(tmp_path)
    r = uptrain("--model", str(src), "--text", str(tmp_path / "text.txt"), "--steps", "15",
                "--out", str(tmp_path / "out"), "--eval", str(tmp_path / "text.txt"))
    assert r.exit_code == 0, r.output
    before, after = [float(x) for x in r.stdout.split("perplexity ")[1].split(" -> ")]
    assert after < before
    record = json.loads((tmp_path / "out" / "xllama_convert.json").read_text())
    assert record["method"] == "uptrain" and "model.safetensors" in record["sha256"]
    gen = runner.invoke(app, ["generate", "--model", str(tmp_path / "out"), "-n", "3", "--temperature", "0", "The"])
    assert gen.exit_code == 0, gen.output


def test_killed_uptrain_resumes_to_the_same_weights(tmp_path):
    src = make_source(tmp_path)
    common = ["--model", str(src), "--text", str(tmp_path / "text.txt"), "--steps", "8", "--save-every", "2"]
    assert uptrain(*common, "--out", str(tmp_path / "straight")).exit_code == 0
    killed = uptrain(*common, "--out", str(tmp_path / "resumed"), env={"XLLAMA_UPTRAIN_STOP_AFTER": "5"})
    assert killed.exit_code == 2 and "--resume" in killed.stderr
    assert not (tmp_path / "resumed").exists()
    r = uptrain(*common, "--out", str(tmp_path / "resumed"), "--resume")
    assert r.exit_code == 0, r.output
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert not list(tmp_path.glob(".*uptrain-state*"))  # the state goes once the result is written


def test_uptrain_refuses_to_overwrite_and_needs_its_inputs(tmp_path):
    src = make_source(tmp_path)
    (tmp_path / "out").mkdir()
    r = uptrain("--model", str(src), "--text", str(tmp_path / "text.txt"), "--out", str(tmp_path / "out"))
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = uptrain("--model", str(src), "--out", str(tmp_path / "new"))
    assert r.exit_code == 2 and "--text" in r.stderr


def test_generate_without_model_uses_the_demo():
    assert (DEMO_MODEL / "model.safetensors").is_file()
    r = runner.invoke(app, ["generate", "-n", "12", "--seed", "0", "Once upon a time"])
    assert r.exit_code == 0, r.output
    assert "built-in demo model" in r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > len("Once upon a time") + 10


def test_demo_model_is_multi_head_bf16_and_small():
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    assert cfg["num_attention_heads"] == cfg["num_key_value_heads"] == 8
    weights = load_file(DEMO_MODEL / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert sum(f.stat().st_size for f in DEMO_MODEL.iterdir()) < 10_000_000
