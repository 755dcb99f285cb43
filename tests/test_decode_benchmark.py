"""benchmarks/decode.py on a tiny random model: both systems measured, ratios, the greedy check."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_SHAPE, benchmark

TINY = [*TINY_SHAPE, "--max-seq-len", "128", "--prompt-len", "16,24", "--new-tokens", "8", "--repeats", "1", "--batch", "2"]


@pytest.fixture(scope="module")
def decode_bench():
    return benchmark("decode")


def test_tiny_run_measures_both_systems_and_matches_greedy_tokens(decode_bench, tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert decode_bench.main([*TINY, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["dtype"] == "float32" and doc["memory_bandwidth"]["gbs"] > 0
    assert [r["prompt_len"] for r in doc["runs"]] == [16, 24]
    for run in doc["runs"]:
        assert set(run["systems"]) == {"xllama", "transformers"}
        for figs in run["systems"].values():
            assert len(figs["prefill_s_runs"]) == len(figs["decode_s_runs"]) == 1
            assert figs["decode_tok_s"] > 0 and figs["prefill_tok_s"] > 0 and figs["bandwidth_fraction"] > 0
        assert run["ratios"]["prefill"] > 0 and run["ratios"]["decode"] > 0
        assert run["greedy"] == {"identical": True, "rows": 2, "rows_differing": 0, "first_difference": None}
    printed = capsys.readouterr().out
    assert "probe bandwidth:" in printed and "greedy tokens (prompt 24): identical" in printed


def test_differing_tokens_are_reported_not_raised(decode_bench):
    got = decode_bench.compare_tokens([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6], [7, 8, 0]])
    assert got == {"identical": False, "rows": 3, "rows_differing": 2, "first_difference": 1}


def test_bad_flag_is_one_error_line(decode_bench, capsys):
    with pytest.raises(SystemExit) as e:
        decode_bench.main(["--repeats", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --repeats must be positive\n"
