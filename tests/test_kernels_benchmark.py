"""benchmarks/kernels.py on a tiny random model: every choice measured in turn, its ratio to the
first, in the default path's activations or the weights' own, with the fused attention step or not,
a choice that serves no layer and a malformed one refused with one error line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_SHAPE, benchmark

TINY = [*TINY_SHAPE, "--max-seq-len", "64", "--prompt-len", "16", "--new-tokens", "5", "--repeats", "2"]


@pytest.fixture(scope="module")
def kernels():
    return benchmark("kernels")


def test_every_choice_is_timed_against_the_first(kernels, tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert kernels.main([*TINY, "plain:aten:aten", "plain:split:aten", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["choice"] for r in rows] == ["plain: aten / aten", "plain: split / aten"]
    assert rows[0]["decode_speed_vs_first"] == rows[0]["prefill_speed_vs_first"] == 1.0
    for r in rows:
        assert len(r["decode_ms_runs"]) == 2 and r["decode_ms_per_step"] > 0 and r["prefill_tok_s"] > 0
        assert r["decode_speed_vs_first"] > 0
    assert "plain: split / aten" in capsys.readouterr().out


def test_a_copy_computes_in_float32_or_in_its_weights_dtype(kernels, monkeypatch, tmp_path):
    """bfloat16 weights: float32 activations as the default path has them, or bfloat16 (@weights)."""
    built = []
    real = kernels.build
    monkeypatch.setattr(kernels, "build", lambda *a: built.append(real(*a)) or built[-1])
    out = tmp_path / "kernels.json"
    assert kernels.main([*TINY, "--dtype", "bfloat16", "plain:aten:aten@weights", "plain:aten:aten",
                         "--json", str(out)]) == 0
    assert [m.activation_dtype for m in built] == [torch.bfloat16, torch.float32]
    assert [r["choice"] for r in json.loads(out.read_text())["rows"]] == [
        "plain: aten / aten @weights", "plain: aten / aten"]


def test_a_copy_given_the_fused_attention_step_decodes_with_it(kernels, monkeypatch, tmp_path):
    built = []
    real = kernels.build
    monkeypatch.setattr(kernels, "build", lambda *a: built.append(real(*a)) or built[-1])
    out = tmp_path / "kernels.json"
    assert kernels.main([*TINY, "plain:aten:aten", "plain:aten:aten@fused", "--json", str(out)]) == 0
    assert [[b.self_attn.fused_step is not None for b in m.model.layers] for m in built] == [[False] * 2, [True] * 2]
    assert [r["choice"] for r in json.loads(out.read_text())["rows"]] == [
        "plain: aten / aten", "plain: aten / aten @fused"]


def test_a_copy_given_the_block_step_decodes_with_it(kernels, monkeypatch, tmp_path):
    built = []
    real = kernels.build
    monkeypatch.setattr(kernels, "build", lambda *a: built.append(real(*a)) or built[-1])
    assert kernels.main([*TINY, "plain:aten:aten", "plain:numba:aten@block"]) == 0
    assert [[b.fused_step is not None for b in m.model.layers] for m in built] == [[False] * 2, [True] * 2]


@pytest.mark.parametrize("choices,needle", [
    (["plain:aten:aten", "nosuch:aten:aten"], "error: nosuch: aten / aten is no choice for float32 weights; they have plain: aten, split"),
    (["plain:aten:aten", "fbgemm-fp16:fbgemm:fbgemm"], "error: fbgemm-fp16: fbgemm / fbgemm is no choice for float32"),
    (["plain:aten:aten", "plain:aten"], "error: argument choices: expected LAYOUT:FEW:MANY, then any of @weights, @separate, @fused, @block, got 'plain:aten'"),
    (["plain:aten:aten", "plain:aten:aten@float16"], "error: argument choices: expected LAYOUT:FEW:MANY, then"),
    (["plain:aten:aten"], "error: give at least two choices"),
    (["plain:aten:aten", "plain:aten:aten@separate@fused"], "error: argument choices: @fused takes q, k and v from one product"),
    (["--dtype", "bfloat16", "plain:aten:aten", "plain:aten:aten@weights@fused"], "error: @fused and @block need float32 activations"),
    (["plain:aten:aten", "plain:aten:aten@separate@block"], "error: argument choices: @block takes q, k and v from one product"),
])
def test_a_choice_that_cannot_run_is_one_error_line(kernels, capsys, choices, needle):
    try:
        code = kernels.main([*TINY, *choices])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(needle) and err.count("\n") == 1
