"""`xllama generate` end to end on the trained stories260K fixture, in every checkpoint layout."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import STORY, fixture
from xllama_cli.cli import app

runner = CliRunner()
PROMPT = "Once upon a time"


def run_generate(*args: str):
    return runner.invoke(app, ["generate", "--temperature", "0", "--quiet", *args])


def test_hf_fixture_gives_the_known_greedy_story():
    r = run_generate("--model", str(fixture("stories260K-hf")), "-n", "60", PROMPT)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(STORY)


@pytest.mark.parametrize("layout", ["stories260K-meta", "stories260K-meta-mp2"])
def test_meta_layouts_give_the_same_tokens_as_hf(layout):
    want = run_generate("--model", str(fixture("stories260K-hf")), "-n", "80", PROMPT).stdout
    got = run_generate("--model", str(fixture(layout)), "-n", "80", PROMPT).stdout
    assert got == want


def test_attn_mha_repeating_heads_changes_nothing():
    want = run_generate("--model", str(fixture("stories260K-hf")), "-n", "80", PROMPT).stdout
    got = run_generate("--model", str(fixture("stories260K-hf")), "--attn", "MHA", "-n", "80", PROMPT).stdout
    assert got == want


def test_attn_mqa_runs_and_differs():
    r = run_generate("--model", str(fixture("stories260K-hf")), "--attn", "MQA", "-n", "20", PROMPT)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(PROMPT) and not r.stdout.startswith(STORY)


def test_summary_goes_to_stderr_and_quiet_drops_it():
    model = str(fixture("stories260K-hf"))
    loud = runner.invoke(app, ["generate", "--model", model, "--temperature", "0", "-n", "5", PROMPT])
    assert "prompt tokens 5" in loud.stderr and "tok/s" in loud.stderr
    assert "tok/s" not in loud.stdout
    assert "tok/s" not in run_generate("--model", model, "-n", "5", PROMPT).stderr


def test_same_seed_same_text_different_seed_different_text():
    model = str(fixture("stories260K-hf"))
    args = ["generate", "--model", model, "--quiet", "--temperature", "1.0", "-n", "40"]
    a = runner.invoke(app, [*args, "--seed", "1", PROMPT]).stdout
    b = runner.invoke(app, [*args, "--seed", "1", PROMPT]).stdout
    c = runner.invoke(app, [*args, "--seed", "2", PROMPT]).stdout
    assert a == b and a != c


def test_batch_file_prompts_each_equal_their_own_run(tmp_path):
    model = str(fixture("stories260K-hf"))
    prompts = ["Once upon a time", "The little dog", "Lily and Tom went to the big park to"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    batch = run_generate("--model", model, "-n", "30", "--batch-file", str(tmp_path / "p.txt")).stdout
    alone = [run_generate("--model", model, "-n", "30", p).stdout for p in prompts]
    assert batch == "\n".join(alone)


def test_python_m_entry_point_works_like_the_script():
    r = subprocess.run([sys.executable, "-m", "xllama_cli", "generate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--attn", "--groups", "--rope", "--rope-factor", "--top-p", "--seed", "--batch-file", "--dtype"):
        assert flag in r.stdout
