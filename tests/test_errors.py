"""Bad input through the CLI: one `error:` line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import cli_fails as fails, fixture, make_hf_checkpoint
from xllama_cli.cli import app

runner = CliRunner()


def gen(model, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--temperature", "0", "-n", "3", *extra, "hello"]


@pytest.fixture
def story_copy(tmp_path):
    dst = tmp_path / "story"
    shutil.copytree(fixture("stories260K-hf"), dst)
    return dst


def test_missing_model_folder(tmp_path):
    fails(gen(tmp_path / "nope"), "does not exist", "nope")


def test_folder_without_a_checkpoint(tmp_path):
    fails(gen(tmp_path), "holds no checkpoint")


def test_missing_tokenizer(story_copy):
    (story_copy / "tokenizer.model").unlink()
    fails(gen(story_copy), "no tokenizer.model", str(story_copy))


def test_unknown_rope(story_copy):
    fails(gen(story_copy, "--rope", "spiral"), "unknown --rope 'spiral'", "rotary")


def test_unknown_attn(story_copy):
    fails(gen(story_copy, "--attn", "XQA"), "unknown --attn 'XQA'", "MHA, GQA, MQA")


def test_group_count_that_does_not_divide(story_copy):
    fails(gen(story_copy, "--attn", "GQA", "--groups", "3"), "--groups 3", "valid group counts: 1, 2, 4, 8")


def test_prompt_longer_than_the_context(story_copy):
    r = runner.invoke(app, ["generate", "--model", str(story_copy), "-n", "2", "word " * 600])
    assert r.exit_code == 2 and "context is 512" in r.stderr


def test_cuda_asked_for_but_absent(story_copy):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    fails(gen(story_copy, "--device", "cuda"), "CUDA is not available")


def test_truncated_safetensors(story_copy):
    f = story_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fails(gen(story_copy), "corrupt or truncated", "model.safetensors")


def test_garbage_safetensors(story_copy):
    (story_copy / "model.safetensors").write_bytes(b"\x00" * 100)
    fails(gen(story_copy), "corrupt or truncated")


def test_shapes_that_do_not_match_the_config(story_copy):
    cfg = json.loads((story_copy / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (story_copy / "config.json").write_text(json.dumps(cfg))
    fails(gen(story_copy), "mlp", "do not match")


def test_kv_heads_in_config_that_do_not_match_weights(story_copy):
    cfg = json.loads((story_copy / "config.json").read_text())
    cfg["num_key_value_heads"] = 2
    (story_copy / "config.json").write_text(json.dumps(cfg))
    fails(gen(story_copy), "k_proj", "do not match")


def test_unreadable_config_json(story_copy):
    (story_copy / "config.json").write_text("{not json")
    fails(gen(story_copy), "config.json")


def test_rope_factor_required_for_scaled_rope(story_copy):
    fails(gen(story_copy, "--rope", "linear"), "--rope-factor")


def test_no_prompt(story_copy):
    fails(["generate", "--model", str(story_copy)], "no prompt")


def test_pickle_checkpoint_is_loaded_weights_only(tmp_path):
    """A pytorch_model.bin holding pickled code is refused, not executed."""
    make_hf_checkpoint(tmp_path, tokenizer=True)
    (tmp_path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    fails(gen(tmp_path), "pytorch_model.bin")
    assert not (tmp_path / "PWNED").exists()
