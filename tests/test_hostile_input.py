"""Hostile and careless input through the CLI: one `error:` line, exit 2, nothing written to stdout
or disk, nothing a user had removed; and the same rules through the Python API."""

from __future__ import annotations

import ast
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, cli_fails as fails
from xllama_cli.cli import DEMO_MODEL, app
from xllama_cli.errors import XllamaError

runner = CliRunner()
TEXT = "\n\n".join(f"The {a} {b} went to the {c}." for a in ("little", "old", "brave")
                   for b in ("king", "girl", "fox") for c in ("forest", "castle", "well"))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """The demo model in a folder of its own, beside a user's unrelated file."""
    shutil.copytree(DEMO_MODEL, tmp_path / "models" / "demo")
    (tmp_path / "models" / "notes.txt").write_text("a user's own file")
    (tmp_path / "text.txt").write_text(TEXT)
    return tmp_path / "models" / "demo"


# ---- the one rule for commands that write ----
def test_uptrain_force_never_replaces_its_source_or_the_folder_holding_it(tmp_path, demo_copy):
    before = tree(tmp_path / "models")
    common = ["uptrain", "--model", str(demo_copy), "--text", str(tmp_path / "text.txt"), "--steps", "1",
              "--batch", "1", "--context", "16", "--force"]
    fails([*common, "--out", str(demo_copy)], "would replace the source")
    fails([*common, "--out", str(tmp_path / "models")], "would replace the source")
    fails([*common, "--out", str(demo_copy / "inner")], "would replace the source")
    assert tree(tmp_path / "models") == before
    assert not list(tmp_path.glob(".*uptrain-state*"))


def test_no_command_replaces_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mine.txt").write_text("a user's file")
    monkeypatch.chdir(tmp_path / "work")
    demo = str(DEMO_MODEL)
    fails(["convert", demo, "--groups", "2", "--out", ".", "--force"], "working folder")
    fails(["convert", demo, "--groups", "2", "--out", str(tmp_path), "--force"], "working folder")
    assert (tmp_path / "work" / "mine.txt").is_file()


def test_bench_files_follow_the_same_rule(tmp_path, demo_copy):
    before = tree(tmp_path / "models")
    common = ["bench", "--model", str(demo_copy), "--groups", "8", "--repeats", "1", "--batch", "1", "--force"]
    fails([*common, "--out", str(demo_copy / "config.json")], "would replace the source")
    fails([*common, "--out", str(tmp_path / "models" / "notes.txt")], "unknown file type")
    (tmp_path / "dir.json").mkdir()
    fails([*common, "--out", str(tmp_path / "dir.json")], "is a folder")
    assert tree(tmp_path / "models") == before


def test_download_out_follows_the_same_rule_before_any_request(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a request would fail otherwise
    (tmp_path / "file").write_text("a user's file")
    fails(["download", "owner/name", "--out", str(tmp_path / "file")], "is a file")
    monkeypatch.chdir(tmp_path)
    fails(["download", "owner/name", "--out", "."], "working folder")
    assert (tmp_path / "file").read_text() == "a user's file"


# ---- text that is not UTF-8 ----
def test_prompt_with_bytes_that_are_not_utf8():
    # Python hands undecodable argv bytes over as lone surrogates (surrogateescape): b"\xff" -> "\udcff"
    fails(["generate", "--model", str(DEMO_MODEL), "-n", "2", "Once \udcff upon"], "the prompt is not valid UTF-8", "byte 0xff")


def test_batch_file_with_bytes_that_are_not_utf8(tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"fine\nnot \xc3\x28 fine\n")
    fails(["generate", "--model", str(DEMO_MODEL), "-n", "2", "--batch-file", str(tmp_path / "prompts.txt")],
          "--batch-file", "not UTF-8", "line 2")


def test_chat_stdin_with_bytes_that_are_not_utf8():
    r = subprocess.run([sys.executable, "-m", "xllama_cli", "chat", "--temperature", "0", "-n", "4"],
                       input=b"hello\nbad \xff line\n", capture_output=True, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: line 2 of the input is not valid UTF-8 (byte 0xff at character 5); save it as UTF-8 text"]


def test_system_prompt_with_bytes_that_are_not_utf8():
    fails(["chat", "--model", str(DEMO_MODEL), "--system", "be \udcfe kind"], "--system is not valid UTF-8")


# ---- flags that silently meant something else ----
@pytest.mark.parametrize("flag,value,needle", [
    ("--top-p", "0", "top-p 0.0 is out of range"), ("--top-p", "1.5", "top-p 1.5 is out of range"),
    ("--top-p", "nan", "top-p nan"), ("--top-k", "-5", "top-k -5 is out of range"),
    ("--temperature", "-1", "temperature -1.0 is out of range"), ("--temperature", "inf", "temperature inf"),
    ("--temperature", "nan", "temperature nan"), ("-n", "-1", "max new tokens -1 is out of range"),
    ("-n", "0", "max new tokens 0 is out of range"),
])
def test_generate_refuses_sampling_values_out_of_range(flag, value, needle):
    out = fails(["generate", "--model", str(DEMO_MODEL), flag, value, "Once"], needle)
    assert "must be" in out


@pytest.mark.parametrize("flag,value,needle", [
    ("--top-p", "0", "top-p 0.0"), ("--top-k", "-1", "top-k -1"), ("--temperature", "nan", "temperature nan"),
    ("-n", "0", "--max-new-tokens must be at least 1"),
])
def test_chat_refuses_the_same_values_before_loading(flag, value, needle):
    fails(["chat", "--model", str(DEMO_MODEL), flag, value], needle)


def test_top_k_zero_means_off():
    on = runner.invoke(app, ["generate", "-n", "6", "--seed", "3", "--temperature", "1", "--top-k", "0",
                             "--top-p", "1", "-q", "Once"])
    off = runner.invoke(app, ["generate", "-n", "6", "--seed", "3", "--temperature", "1", "-q", "--top-p", "1",
                              "Once"])
    assert on.exit_code == 0 and on.stdout == off.stdout


def test_python_api_checks_sampling_as_the_cli_does():
    import xllama_cli as x
    from xllama_cli.sampling import Sampling

    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-5), dict(temperature=math.nan),
                dict(temperature=-1.0), dict(temperature=math.inf), dict(top_k=True), dict(seed=-1)):
        with pytest.raises(XllamaError, match="out of range"):
            Sampling(**bad)
    m, tok = x.load_model(str(DEMO_MODEL)), x.load_tokenizer(str(DEMO_MODEL))
    with pytest.raises(XllamaError, match="max new tokens -1"):
        x.generate(m, tok, "Once", max_new_tokens=-1)


def test_eval_refuses_a_window_longer_than_the_model(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    fails(["eval", "--model", str(DEMO_MODEL), "--text", str(tmp_path / "t.txt"), "--context", "100000"],
          "--context 100000 is longer than the model's context, 256 tokens")


def test_uptrain_refuses_bad_numbers_before_any_work(tmp_path, demo_copy):
    common = ["uptrain", "--model", str(demo_copy), "--text", str(tmp_path / "text.txt"),
              "--out", str(tmp_path / "out"), "--steps", "2", "--batch", "1", "--context", "16"]
    fails([*common, "--lr", "nan"], "--lr nan is out of range")
    fails([*common, "--lr", "inf"], "--lr inf is out of range")
    fails([*common, "--dtype", "float8"], "unknown --dtype 'float8'")
    fails([*common, "--save-every", "-1"], "--save-every -1")
    fails([*common[:-2], "--context", "0"], "--context 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "text.txt"]  # no out, no state file


# ---- nothing on stdout before the checks ----
def test_generate_writes_nothing_before_refusing_a_long_prompt():
    r = runner.invoke(app, ["generate", "-n", "2", "word " * 400])
    assert r.exit_code == 2 and r.stdout == ""
    assert "the model's context is 256" in r.stderr


# ---- display ----
def _lines_fit(text: str, width: int = 80) -> None:
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width, text


def test_bench_tables_stay_whole_at_80_columns_in_a_pipe():
    env = {**os.environ, "COLUMNS": "80"}
    presets = subprocess.run([sys.executable, "-m", "xllama_cli", "bench", "--list-presets"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert presets.returncode == 0, presets.stderr
    _lines_fit(presets.stdout)
    assert re.search(r"llama2-70b +80 +8192 +64 +8 +28672 +32000 +68\.98B +128\.5 GiB +78\.37B", presets.stdout)
    r = subprocess.run([sys.executable, "-m", "xllama_cli", "bench", "--groups", "1,8", "--repeats", "1",
                        "--batch", "1", "--input-len", "8", "--output-len", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    _lines_fit(r.stdout)
    assert "8 (MHA)" in r.stdout and "1 (MQA)" in r.stdout


def test_bench_help_names_the_plot_extra_whole():
    r = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert "pip install 'xllama-cli[plot]'" in r.stdout


def test_bare_bench_uses_the_demo_model_and_fits_its_context():
    r = runner.invoke(app, ["bench", "--groups", "8", "--repeats", "1", "--batch", "1"])
    assert r.exit_code == 0, r.output
    assert "built-in demo model" in r.stderr
    assert "input 192, output 64" in r.stderr  # 256 positions: a quarter for the output, the rest the prompt


# ---- the install a user does ----
def test_every_runtime_import_is_declared():
    """A plain `pip install -e .` must bring everything the package imports outside its optional paths."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower().replace("-", "_") for d in reqs}

    declared = names(project["dependencies"])
    # the [plot] and [serve] extras: imported only behind a clear error naming the extra
    # (plotting.py; serve.py, whose error tests/test_serve.py checks)
    extras = project["optional-dependencies"]
    optional = names(extras["plot"]) | names(extras["serve"])
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for path in (ROOT / "src" / "xllama_cli").rglob("*.py"):
        source = path.read_text()
        if ".numpy()" in source:
            missing |= {"numpy"} - declared
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top == "xllama_cli" or top in optional:
                    continue
                if top.lower() not in declared:
                    missing.add(f"{top} ({path.name})")
    assert not missing, f"imported but not in [project].dependencies: {sorted(missing)}"


def test_readme_python_example_runs_on_the_demo_model():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"From Python:\n\n```python\n(.*?)```", text, re.S).group(1)
    code = block.replace('"./ckpt"', repr(str(DEMO_MODEL)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("[")


def test_a_tokenizer_bigger_than_the_models_vocabulary_is_one_error_line(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    # the demo's weights cut to 100 embeddings, its 512-piece tokenizer kept
    shutil.copytree(DEMO_MODEL, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    w = load_file(tmp_path / "m" / "model.safetensors")
    w = {k: (v[:100] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in w.items()}
    save_file(w, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    (tmp_path / "t.txt").write_text(TEXT)
    for args in (["generate", "-n", "2", "Once upon a time"], ["eval", "--text", str(tmp_path / "t.txt")]):
        fails([args[0], "--model", str(tmp_path / "m"), *args[1:]], "the tokenizer does not belong to this model")


def test_a_config_with_another_activation_is_refused(tmp_path):
    import json

    shutil.copytree(DEMO_MODEL, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    fails(["generate", "--model", str(tmp_path / "m"), "hi"], 'hidden_act "gelu" is not supported')
