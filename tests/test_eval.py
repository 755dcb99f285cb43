"""`xllama eval`: sliding-window perplexity, checked against transformers' loss on the same windows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import STORY, fixture
from xllama_cli.cli import app
from xllama_cli.evaluate import windows

runner = CliRunner()

# Written for these tests: TinyStories-like sentences, so the fixture model finds them plausible.
TEXT = (STORY + " Lily ran to her mom and said, \"Mom, can you help me get the ball?\" Her mom smiled "
        "and said, \"Yes, I can help you.\" They went to the park together. Mom was tall, so she got "
        "the ball down from the tree. Lily was very happy. She said thank you and hugged her mom. Then "
        "they played with the red ball all day. The sun was warm and the birds sang in the trees. When "
        "it was time to go home, Lily held the ball and smiled. It was the best day ever.\n")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(TEXT)
    return path


def transformers_perplexity(model_dir, text: str, context: int, stride: int) -> tuple[float, int]:
    """The window scheme of `xllama eval`, written out independently with transformers' own loss:
    each window is BOS + up to context-1 text tokens, starting every `stride` tokens; tokens an
    earlier window scored are masked out of the labels (-100)."""
    import sentencepiece as spm
    from transformers import LlamaForCausalLM

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    ids = sp.encode(text)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, scored, begin, done = 0.0, 0, 0, 0
    while done < len(ids):
        end = min(begin + context - 1, len(ids))
        inp = [sp.bos_id()] + ids[begin:end]
        labels = [-100] + [t if begin + i >= done else -100 for i, t in enumerate(ids[begin:end])]
        n = sum(1 for x in labels if x != -100)
        with torch.no_grad():
            loss = hf(torch.tensor([inp]), labels=torch.tensor([labels])).loss  # mean over scored tokens
        nll += loss.item() * n
        scored += n
        done = end
        begin += stride
    return math.exp(nll / scored), scored


@pytest.mark.parametrize("context,stride", [(512, 256), (64, 63), (96, 40), (40, 39), (128, 13)])
def test_perplexity_matches_transformers_loss_on_the_same_windows(text_file, context, stride):
    model = fixture("stories260K-hf")
    r = runner.invoke(app, ["eval", "--model", str(model), "--text", str(text_file), "--context", str(context),
                            "--stride", str(stride), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    want, scored = transformers_perplexity(model, TEXT, context, stride)
    assert got["tokens_scored"] == scored > 200
    assert abs(got["perplexity"] - want) / want < 1e-3, (got["perplexity"], want)
    assert (got["context"], got["stride"]) == (context, stride)


def test_default_window_is_the_models_context_with_half_stride(text_file):
    r = runner.invoke(app, ["eval", "--model", str(fixture("stories260K-hf")), "--text", str(text_file), "--json"])
    got = json.loads(r.stdout)
    assert (got["context"], got["stride"], got["windows"]) == (512, 256, 1)
    want, _ = transformers_perplexity(fixture("stories260K-hf"), TEXT, 512, 256)
    assert abs(got["perplexity"] - want) / want < 1e-3
    assert 1 < got["perplexity"] < 20  # the model knows stories like this one
    assert got["tokens_per_s"] > 0 and got["nll"] == pytest.approx(math.log(got["perplexity"]))


def test_human_output_names_perplexity_tokens_and_speed(text_file):
    r = runner.invoke(app, ["eval", "--model", str(fixture("stories260K-hf")), "--text", str(text_file),
                            "--context", "128", "--stride", "127"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("perplexity") and lines[1].startswith("tokens scored") and lines[2].startswith("tokens/s")
    assert float(lines[0].split()[-1]) > 1


def test_on_the_fly_groups_equal_the_converted_checkpoint(tmp_path, text_file):
    """eval --groups judges a conversion without writing it: same number as eval of what convert writes."""
    model = str(fixture("stories260K-hf"))
    assert runner.invoke(app, ["convert", model, "--groups", "2", "--out", str(tmp_path / "g2")]).exit_code == 0
    args = ["--text", str(text_file), "--json"]
    fly = json.loads(runner.invoke(app, ["eval", "--model", model, "--groups", "2", *args]).stdout)
    written = json.loads(runner.invoke(app, ["eval", "--model", str(tmp_path / "g2"), *args]).stdout)
    native = json.loads(runner.invoke(app, ["eval", "--model", model, *args]).stdout)
    assert fly["kv_heads"] == written["kv_heads"] == 2 and native["kv_heads"] == 4
    assert fly["perplexity"] == pytest.approx(written["perplexity"], rel=1e-6)
    assert fly["perplexity"] != pytest.approx(native["perplexity"], rel=1e-3)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.integers(2, 80), st.data())
def test_windows_score_every_token_exactly_once(n, context, data):
    stride = data.draw(st.integers(1, context - 1))
    plan = windows(n, context, stride)
    scored = [i for w in plan for i in range(w.scored, w.end)]
    assert scored == list(range(n))
    for k, w in enumerate(plan):
        assert w.begin == k * stride and w.end - w.begin <= context - 1  # plus BOS: at most `context`
        assert w.begin <= w.scored < w.end
        if k > 0:  # after the first window, at least context-1-stride tokens of context (or all there are)
            assert w.scored - w.begin >= min(context - 1 - stride, w.scored)
    assert plan[-1].end == n


@pytest.mark.parametrize("args,needle", [
    (["--context", "1"], "--context 1 is too small"),
    (["--context", "64", "--stride", "64"], "--stride 64 must be between 1 and"),
    (["--stride", "0", "--context", "8"], "--stride 0"),
])
def test_bad_windows_are_one_error_line(text_file, args, needle):
    r = runner.invoke(app, ["eval", "--model", str(fixture("stories260K-hf")), "--text", str(text_file), *args])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and needle in r.stderr, r.output


def test_bad_text_files_are_one_error_line(tmp_path):
    model = str(fixture("stories260K-hf"))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    for args, needle in ((["--text", str(tmp_path / "nope.txt")], "does not exist"),
                         (["--text", str(tmp_path / "empty.txt")], "is empty"),
                         (["--text", str(tmp_path / "bin.txt")], "not UTF-8"),
                         (["--text", str(tmp_path)], "is a folder"),
                         ([], "no --text")):
        r = runner.invoke(app, ["eval", "--model", model, *args])
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and needle in r.stderr, (args, r.output)
        assert len(r.stderr.strip().splitlines()) == 1
