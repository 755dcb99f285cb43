"""The command line's shape: shared options declared once, a checkpoint opened once per command,
help that needs no torch, source lines that fit in 100 characters."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, make_hf_checkpoint
from xllama_cli.checkpoint import Checkpoint, open_checkpoint
from xllama_cli.cli import app
from xllama_cli.options import SamplingOptions, with_groups

runner = CliRunner()
SRC = ROOT / "src" / "xllama_cli"
TEXT = "The little fox went to the forest and found a ring. " * 8
# files another part of the same change rewrites; they are wrapped when it lands (then this goes)
def opens_of_checkpoint(args: list[str]) -> int:
    """Run the CLI in this thread and count how often open_checkpoint opens a folder, wherever it
    is called from (each module holds its own name for it, so the function's code is watched);
    a call given a Checkpoint already opened opens nothing."""
    calls = 0
    code = open_checkpoint.__code__

    def count(frame, event, _arg):
        nonlocal calls
        if event == "call" and frame.f_code is code:
            calls += not isinstance(frame.f_locals[code.co_varnames[0]], Checkpoint)

    sys.setprofile(count)
    try:
        r = runner.invoke(app, args, input="Once upon a time\n")
    finally:
        sys.setprofile(None)
    assert r.exit_code == 0, r.output
    return calls


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model")
    make_hf_checkpoint(path, tokenizer=True, vocab_size=512, num_key_value_heads=2, hidden_size=32,
                       intermediate_size=48, num_attention_heads=4, max_position_embeddings=64)
    (path.parent / "text.txt").write_text(TEXT)
    return path


@pytest.mark.parametrize("command", [
    ["generate", "-n", "2", "--attn", "MQA", "Once upon"],
    ["chat", "-n", "2", "--template", "plain"],
    ["eval", "--context", "32", "--text", "{text}"],
    ["uptrain", "--steps", "1", "--batch", "1", "--context", "16", "--text", "{text}",
     "--out", "{out}"],
], ids=lambda c: c[0])
def test_each_command_opens_its_checkpoint_once(model, tmp_path, command):
    args = [a.format(text=model.parent / "text.txt", out=tmp_path / "out") for a in command]
    assert opens_of_checkpoint([args[0], "--model", str(model), *args[1:]]) == 1


def test_convert_with_eval_opens_source_and_result_once_each(model, tmp_path):
    args = ["convert", str(model), "--out", str(tmp_path / "out"), "--groups", "1",
            "--eval", str(model.parent / "text.txt"), "--context", "32"]
    assert opens_of_checkpoint(args) == 2


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_shared_options_are_listed_in_every_command_that_loads_a_model(command):
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for flag in ("--model", "--attn", "--groups", "--rope", "--rope-factor", "--device", "--dtype",
                 "--quantize"):
        assert flag in r.stdout, flag
    sampling = ("--temperature", "--top-k", "--top-p", "--seed", "--compile", "--min-p",
                "--repetition-penalty", "--frequency-penalty", "--presence-penalty", "--stop")
    assert all((flag in r.stdout) == (command != "eval") for flag in sampling)


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "bench", "uptrain"])
def test_a_command_help_answers_without_importing_torch(command):
    code = ("import sys\nfrom xllama_cli.cli import main\n"
            f"sys.argv = ['xllama', {command!r}, '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert command in r.stdout and r.stderr.strip().splitlines()[-1] == "False", r.stderr


def test_no_source_line_is_over_100_characters():
    long = [f"{f.relative_to(ROOT)}:{n}" for f in sorted(SRC.rglob("*.py"))
            for n, line in enumerate(f.read_text().splitlines(), 1) if len(line) > 100]
    assert not long, f"lines over 100 characters: {', '.join(long)}"


def test_an_option_group_expands_in_place_and_builds_its_dataclass():
    def command(first: int = 1, sample: SamplingOptions = SamplingOptions(), last: int = 2):
        return first, sample, last

    run = with_groups(command)
    assert list(inspect.signature(run).parameters) == [
        "first", "temperature", "top_k", "top_p", "seed", "min_p", "repetition_penalty",
        "frequency_penalty", "presence_penalty", "stop", "last"]
    assert run(first=3, temperature=0.0, top_k=5, top_p=1.0, seed=7, min_p=0.1,
               repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=-0.5,
               stop=["\n"], last=4) == (3, SamplingOptions(0.0, 5, 1.0, 7, 0.1, 1.2, 0.5, -0.5,
                                                           ["\n"]), 4)

    def clash(seed: int = 0, sample: SamplingOptions = SamplingOptions()):
        pass

    with pytest.raises(TypeError, match="repeats a parameter name"):
        with_groups(clash)
