"""`xllama convert` never leaves a half-written destination: bad input, a full disk, Ctrl-C, kill."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import cli_fails, ROOT, fixture, make_hf_checkpoint
from xllama_cli.cli import app

runner = CliRunner()


def fails(args: list[str], *needles: str) -> str:
    return cli_fails(["convert", *args], *needles)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def story():
    return str(fixture("stories260K-hf"))


def test_group_count_that_does_not_divide(tmp_path, story):
    fails([story, "--groups", "3", "--out", str(tmp_path / "out")], "--groups 3", "valid group counts: 1, 2, 4, 8")
    assert leftovers(tmp_path) == []


def test_group_count_that_cannot_be_made_from_the_kv_heads(tmp_path):
    # 6 query heads, 3 KV heads: 1 and 3 by pooling, 6 by repeating; 2 divides 6 but not 3
    make_hf_checkpoint(tmp_path / "src6", hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    fails([str(tmp_path / "src6"), "--groups", "2", "--out", str(tmp_path / "out")], "valid group counts: 1, 3, 6")


def test_source_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty"), "--out", str(tmp_path / "out")], "holds no checkpoint")
    fails([str(tmp_path / "nope"), "--out", str(tmp_path / "out")], "does not exist")
    assert leftovers(tmp_path) == ["empty"]


def test_no_out(story):
    fails([story], "--out")


def test_existing_destination_needs_force(tmp_path, story):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    fails([story, "--out", str(out)], "already exists", "--force")
    assert (out / "mine.txt").read_text() == "a user's file"
    r = runner.invoke(app, ["convert", story, "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == ["out"]  # no temporary or old folder left beside it


def test_destination_that_would_replace_the_source(tmp_path):
    make_hf_checkpoint(tmp_path / "a" / "src")
    fails([str(tmp_path / "a" / "src"), "--out", str(tmp_path / "a" / "src"), "--force"], "would replace the source")
    fails([str(tmp_path / "a" / "src"), "--out", str(tmp_path / "a"), "--force"], "would replace the source")


@pytest.mark.parametrize("flag,value,needle", [
    ("--shard-size", "5XB", "cannot read the size"), ("--shard-size", "0", "must be positive"),
    ("--method", "median", "unknown --method"), ("--dtype", "int4", "unknown --dtype"),
    ("--attn", "XQA", "unknown --attn"),
])
def test_bad_options(tmp_path, story, flag, value, needle):
    fails([story, "--out", str(tmp_path / "out"), flag, value], needle)
    assert leftovers(tmp_path) == []


def test_weights_that_do_not_match_the_config(tmp_path):
    import json
    import shutil

    shutil.copytree(fixture("stories260K-hf"), tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["num_key_value_heads"] = 2
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    fails([str(tmp_path / "src"), "--out", str(tmp_path / "out")], "k_proj", "do not match")
    assert leftovers(tmp_path) == ["src"]


def _limit_file_size():
    # a write past 200 KB fails with EFBIG (an OSError, as a full disk's ENOSPC is) instead of a signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "xllama_cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_write_that_fails_like_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path, story):
    p = _cli("convert", story, "--out", str(tmp_path / "out"), preexec_fn=_limit_file_size)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert err.strip().startswith("error: writing") and len(err.strip().splitlines()) == 1, err
    assert "nothing was written" in err
    assert leftovers(tmp_path) == []


# A conversion that pauses after each written shard, so the test can interrupt it mid-way.
SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from xllama_cli import writer
    flush = writer.ShardWriter.flush
    def slow_flush(self):
        flush(self)
        print("shard written", flush=True)
        time.sleep(60)
    writer.ShardWriter.flush = slow_flush
    from xllama_cli.cli import main
    sys.argv = ["xllama", *sys.argv[1:]]
    main()
""")


def _start_slow_convert(src: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "convert", src, "--out", str(out),
                             "--shard-size", "200KB"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_first_shard(p: subprocess.Popen, parent: Path, prefix: str) -> Path:
    """Block until the run reports a shard on disk; returns its temporary folder."""
    assert p.stdout.readline().strip() == "shard written"
    temps = [d for d in parent.iterdir() if d.name.startswith(f"{prefix}{p.pid}-")]
    assert len(temps) == 1 and any(temps[0].iterdir()), "the run should be mid-way, with a shard on disk"
    return temps[0]


def test_interrupted_conversions_leave_no_destination_and_no_temporary_files(tmp_path, story):
    """Ctrl-C (SIGINT) and kill (SIGTERM), each mid-way through a conversion (the two run at once)."""
    runs = {sig: _start_slow_convert(story, tmp_path / f"out{sig.value}") for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig, p in runs.items():
            _wait_for_first_shard(p, tmp_path, f".out{sig.value}.tmp-")
        for sig, p in runs.items():
            p.send_signal(sig)
        for p in runs.values():
            p.wait(timeout=60)
    finally:
        for p in runs.values():
            p.kill()
    for sig, p in runs.items():
        assert p.returncode != 0, sig
        assert "Traceback" not in p.stderr.read(), sig
    assert leftovers(tmp_path) == []


def test_killed_conversion_leaves_no_destination_and_a_rerun_cleans_up_after_it(tmp_path, story):
    """SIGKILL runs no cleanup: its temporary folder stays, and the next run to that destination
    removes it, but not the folder of a run that is still alive."""
    dead, alive = _start_slow_convert(story, tmp_path / "out"), _start_slow_convert(story, tmp_path / "out")
    try:
        dead_tmp = _wait_for_first_shard(dead, tmp_path, ".out.tmp-")
        alive_tmp = _wait_for_first_shard(alive, tmp_path, ".out.tmp-")
        dead.kill()
        dead.wait(timeout=60)
        assert not (tmp_path / "out").exists() and dead_tmp.exists()
        r = runner.invoke(app, ["convert", story, "--out", str(tmp_path / "out")])
        assert r.exit_code == 0, r.output
        assert not dead_tmp.exists() and alive_tmp.exists()
    finally:
        for p in (dead, alive):
            p.kill()
            p.wait(timeout=60)
    assert sorted(leftovers(tmp_path)) == sorted(["out", alive_tmp.name])


def test_eval_text_that_cannot_be_read_fails_before_converting(tmp_path, story):
    fails([story, "--groups", "2", "--out", str(tmp_path / "out"), "--eval", str(tmp_path / "nope.txt")],
          "does not exist")
    assert leftovers(tmp_path) == []
