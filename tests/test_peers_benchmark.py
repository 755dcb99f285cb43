"""benchmarks/peers.py on a tiny random model: every precision's systems measured, ratios, the
bytes a step reads, the other processes' share of the CPUs, and llama.cpp skipped with a line
saying why when it is not built."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_SHAPE, benchmark

TINY = [*TINY_SHAPE, "--max-seq-len", "64", "--prompt-len", "16", "--new-tokens", "6", "--repeats", "1"]


@pytest.fixture(scope="module")
def peers():
    return benchmark("peers")


def test_a_run_without_llamacpp_says_why_and_measures_the_rest(peers, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(peers, "LLAMACPP", tmp_path / "no-such-llamacpp.sh")
    out = tmp_path / "peers.json"
    assert peers.main([*TINY, "--precision", "fp32,int4", "--batch", "1,2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["llama_cpp"]["skipped"] == f"{tmp_path / 'no-such-llamacpp.sh'} not found"
    assert [(r["precision"], r["batch"]) for r in doc["runs"]] == [("fp32", 1), ("fp32", 2), ("int4", 1), ("int4", 2)]
    for run in doc["runs"]:
        assert set(run["systems"]) == {"xllama", "transformers"} and set(run["ratios"]) == {"transformers"}
        for figs in run["systems"].values():
            assert figs["decode_tok_s"] > 0 and figs["prefill_tok_s"] > 0 and len(figs["decode_s_runs"]) == 1
            assert all(v is None or 0 <= v <= 1 for v in figs["others_cpu_share_runs"])
        assert run["decode_bound_tok_s"] > 0
    fp32, int4 = doc["runs"][0], doc["runs"][2]
    assert fp32["greedy"]["identical"]  # float32: the same tokens as transformers
    assert int4["decode_bytes_per_step"] < fp32["decode_bytes_per_step"] / 4
    printed = capsys.readouterr().out
    assert "llama.cpp: skipped (" in printed and "probe bandwidth:" in printed


def test_step_bytes_count_each_precisions_weights(peers):
    from xllama_cli.config import ModelConfig

    cfg = ModelConfig.from_name("bench-220m")
    sizes = {p: peers.step_bytes(cfg, peers.PRECISIONS[p], 1, 1, 2) for p in ("fp32", "bf16", "int8", "int4")}
    linear = 12 * (4 * 1024 * 1024 + 3 * 1024 * 2816) + 32000 * 1024
    assert linear * 4 < sizes["fp32"] < linear * 4 * 1.01
    assert sizes["bf16"] < sizes["fp32"] / 2 + 1 and sizes["int8"] < sizes["bf16"] / 2 + 10**6
    head = 32000 * 1024  # int4 keeps it at int8
    assert (linear - head) * 0.625 + head < sizes["int4"] < ((linear - head) * 0.625 + head) * 1.01


def test_bad_flag_is_one_error_line(peers, capsys):
    with pytest.raises(SystemExit) as e:
        peers.main(["--precision", "fp8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --precision: expected a list of fp32, bf16, int8, int4") and err.count("\n") == 1


def test_llamacpp_decode_after_the_prompt_is_its_pg_test_less_its_pp_test(peers):
    # llama-bench -o json, trimmed to the fields read: 128 prompt tokens in 0.1 s, 64 new tokens
    # from an empty context in 0.5 s, the prompt then 64 new tokens in 0.1 + 0.8 s
    tests = [{"n_prompt": 128, "n_gen": 0, "avg_ns": 1e8, "avg_ts": 1280.0},
             {"n_prompt": 0, "n_gen": 64, "avg_ns": 5e8, "avg_ts": 128.0},
             {"n_prompt": 128, "n_gen": 64, "avg_ns": 9e8, "avg_ts": 213.3}]
    prefill, after_prompt, empty = peers.llamacpp_rates(tests, 64)
    assert (prefill, empty) == (1280.0, 128.0)
    assert after_prompt == pytest.approx(64 / 0.8)
