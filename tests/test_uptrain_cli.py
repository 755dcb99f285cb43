"""`xllama uptrain` and the built-in demo model, through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import ROOT, make_hf_checkpoint
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


UPTRAIN = ["--batch", "2", "--context", "16", "--lr", "1e-3", "--dtype", "float32"]


def uptrain(*args: str):
    return runner.invoke(app, ["uptrain", *UPTRAIN, *args])


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


# enough steps that a run is still going when the test sees its first saved state (at step 2)
STEPS = ["--steps", "300", "--save-every", "2"]


@pytest.fixture
def one_thread():
    """One thread per process: on a shared CPU, several threads per tiny step wait on each other
    far longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """A source checkpoint and the weights of an uptraining run that was never stopped."""
    tmp_path = tmp_path_factory.mktemp("straight")
    src = make_source(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = uptrain("--model", str(src), "--text", str(tmp_path / "text.txt"), *STEPS,
                    "--out", str(tmp_path / "out"))
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    return src, load_file(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_killed_uptrain_resumes_to_the_same_weights(tmp_path, straight_run, one_thread, sig):
    """A real signal to a real process: the run stops after a whole step, saves that step's state,
    writes no --out and exits with 128 + the signal; --resume then ends where a run that never
    stopped ends."""
    src, straight = straight_run
    common = ["--model", str(src), "--text", str(src.parent / "text.txt"), *STEPS,
              "--out", str(tmp_path / "out")]
    state = tmp_path / ".out.uptrain-state.pt"
    child = subprocess.Popen([sys.executable, "-m", "xllama_cli", "uptrain", *UPTRAIN, *common],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=one_thread)
    deadline = time.monotonic() + 300  # a guard against a hung child, not a measurement
    while not state.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(sig)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 128 + sig, err
    assert f"stopped by {sig.name} after step" in err and "--resume continues it" in err, err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "out").exists() and state.is_file()

    r = uptrain(*common, "--resume")
    assert r.exit_code == 0, r.output
    resumed = load_file(tmp_path / "out" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6
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
