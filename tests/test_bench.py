"""`xllama bench`: the JSON/CSV figures, the plot files, presets, and failure handling (tiny sizes)."""

from __future__ import annotations

import csv
import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_hf_checkpoint
from xllama_cli.loading import for_inference
from xllama_cli import bench, report
from xllama_cli.cli import app
from xllama_cli.config import ARCHITECTURES, ModelConfig
from xllama_cli.loading import load_model

TINY = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 8, "vocab_size": 128, "hidden_dim": 96,
        "max_seq_len": 64}
FAST = ["--input-len", "8", "--output-len", "4", "--batch", "2", "--repeats", "2"]


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """A 16 MiB bandwidth probe and one thread keep each run quick on a shared CPU (tiny matrices gain
    nothing from a second thread, and lose much to its waits when the cores are busy)."""
    monkeypatch.setattr(bench, "bandwidth_probe_bytes", lambda device: 16 << 20)
    monkeypatch.setattr(report.out, "width", 200)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def run(*args: str):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


def bench_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out.json"
    result = run(*args, "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_json_has_every_group_with_kv_bytes_proportional_to_groups(tiny, tmp_path):
    data = bench_json(tmp_path, "--config", tiny, "--groups", "1,2,4,8", *FAST)
    rows = data["rows"]
    assert [r["groups"] for r in rows] == [1, 2, 4, 8]
    assert [r["kv_heads"] for r in rows] == [1, 2, 4, 8]
    # K and V, 2 layers, head_dim 8, 8 + 4 slots, float32
    assert [r["kv_cache_bytes_per_sample"] for r in rows] == [2 * 2 * g * 8 * 12 * 4 for g in (1, 2, 4, 8)]
    for r in rows:
        assert r["status"] == "ok" and r["runs"] == 2
        assert all(t > 0 for t in r["prefill_s_runs"] + r["decode_s_runs"])
        assert r["time_per_sample_s"] > 0 and r["prefill_s"] > 0 and r["decode_s_per_token"] > 0
        assert r["decode_gbs"] > 0 and r["bandwidth_fraction"] > 0
    assert rows[-1]["attention"] == "MHA" and rows[-1]["speedup_vs_mha"] == 1.0
    assert rows[0]["attention"] == "MQA"
    assert data["settings"] | {"groups": [1, 2, 4, 8], "input_len": 8, "output_len": 4, "batch": 2,
                               "repeats": 2} == data["settings"]
    assert data["torch"] == torch.__version__ and data["device"] == "cpu" and data["dtype"] == "float32"
    assert data["machine"]["cpu_count"] >= 1 and data["memory_bandwidth"]["gbs"] > 0
    assert data["interrupted"] is False


@pytest.mark.parametrize("kernels,elsize", [("auto", 4), ("plain", 2)])
def test_kv_bytes_are_those_of_the_cache_the_runs_hold(tiny, tmp_path, monkeypatch, kernels, elsize):
    """bfloat16 weights on the CPU's kernels path keep a float32 cache (float32 activations)."""
    monkeypatch.setenv("XLLAMA_KERNELS", kernels)
    rows = bench_json(tmp_path, "--config", tiny, "--groups", "2", "--dtype", "bfloat16", *FAST)["rows"]
    assert rows[0]["kv_cache_bytes_per_sample"] == 2 * 2 * 2 * 8 * 12 * elsize


def test_json_figures_follow_from_the_recorded_runs(tiny, tmp_path):
    data = bench_json(tmp_path, "--config", tiny, "--groups", "2,8", *FAST)
    mha = data["rows"][-1]
    mha_total = statistics.median(p + d for p, d in zip(mha["prefill_s_runs"], mha["decode_s_runs"]))
    for r in data["rows"]:
        totals = [p + d for p, d in zip(r["prefill_s_runs"], r["decode_s_runs"])]
        assert r["time_per_sample_s"] == pytest.approx(statistics.median(totals) / 2)
        assert r["decode_s_per_token"] == pytest.approx(statistics.median(r["decode_s_runs"]) / 3)  # 4 tokens: 3 steps
        assert r["tokens_per_s"] == pytest.approx(2 * 4 / statistics.median(totals))
        assert r["speedup_vs_mha"] == pytest.approx(mha_total / statistics.median(totals))
        # a decode step at slot 8 + s attends over 9 + s slots; steps s = 0, 1, 2
        mean_slots = sum(8 + s + 1 for s in range(3)) / 3
        assert r["kv_read_bytes_per_step"] == round(2 * 2 * 2 * r["groups"] * 8 * 4 * mean_slots)


def test_weight_bytes_match_the_regrouped_model():
    cfg = ModelConfig(**TINY)
    base = bench.random_model(cfg, torch.device("cpu"), torch.float32)
    for g in (1, 4, 8):
        model = bench.regrouped(base, g)
        params = sum(p.numel() for p in model.parameters())
        expected = (params - 128 * 64 + 3 * 64) * 4  # embedding: only the batch's 3 rows are read
        assert bench.weight_bytes_per_step(cfg, g, 3, 4) == expected
        assert model.model.layers[0].self_attn.k_proj.weight.shape == (g * 8, 64)


def test_int8_weight_bytes_match_the_quantized_model():
    """--quantize int8 counts what the quantized model holds: int8 projections and head with a
    scale per row, norms and the embedding's rows at full size."""
    from xllama_cli.quantize import quantize_model

    cfg = ModelConfig(**TINY)
    base = bench.random_model(cfg, torch.device("cpu"), torch.bfloat16)
    for g in (1, 8):
        model = quantize_model(bench.regrouped(base, g))
        held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        expected = held - (128 - 3) * 64 * 2  # embedding: only the batch's 3 rows are read
        assert bench.weight_bytes_per_step(cfg, g, 3, 2, int8=True) == expected


def test_regrouped_model_equals_load_model_with_groups(tmp_path):
    """bench's layouts come from layout.regroup_kv exactly as `generate --groups` loads them, and
    run on the same (packed) weights."""
    make_hf_checkpoint(tmp_path, seed=3, num_key_value_heads=8)
    base = load_model(tmp_path, device="cpu", dtype="float32", pack=False)  # as bench loads it
    tokens = torch.tensor([[1, 5, 9, 17, 33]])
    for g in (1, 2, 4):
        ours = for_inference(bench.regrouped(base, g), decode_batch=None).model(tokens)
        loaded = load_model(tmp_path, groups=g, device="cpu", dtype="float32", decode_batch=None)(tokens)
        torch.testing.assert_close(ours, loaded, rtol=0, atol=0)


def test_preset_small_with_one_layer(tmp_path):
    data = bench_json(tmp_path, "--preset", "small", "--layers", "1", "--groups", "1,16", "--input-len", "4",
                      "--output-len", "2", "--batch", "1", "--repeats", "1")
    assert data["model"]["config"]["n_layers"] == 1 and data["model"]["n_heads"] == 16
    rows = data["rows"]
    assert [r["groups"] for r in rows] == [1, 16]
    assert rows[1]["kv_cache_bytes_per_sample"] == 16 * rows[0]["kv_cache_bytes_per_sample"]
    assert rows[1]["speedup_vs_mha"] == 1.0 and rows[0]["time_per_sample_s"] > 0


def test_default_groups_are_powers_of_two_dividing_heads_plus_mha():
    assert bench.default_groups(16) == [1, 2, 4, 8, 16]
    assert bench.default_groups(40) == [1, 2, 4, 8, 40]
    assert bench.default_groups(1) == [1]


def test_model_checkpoint_is_benched_in_every_reachable_layout(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_hf_checkpoint(ckpt, seed=1, num_key_value_heads=4)
    data = bench_json(tmp_path, "--model", ckpt, *FAST)
    assert [r["groups"] for r in data["rows"]] == [1, 2, 4, 8]  # pooled below 4 KV heads, repeated above
    assert data["model"]["base_kv_heads"] == 4
    assert all(r["status"] == "ok" for r in data["rows"])


def test_csv_has_one_line_per_group_with_settings(tiny, tmp_path):
    out = tmp_path / "out.csv"
    result = run("--config", tiny, "--groups", "1,8", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["groups"]) for r in rows] == [1, 8]
    assert all(float(r["time_per_sample_s"]) > 0 and r["device"] == "cpu" and r["batch"] == "2" for r in rows)
    assert float(rows[1]["speedup_vs_mha"]) == 1.0
    assert int(rows[1]["kv_cache_bytes_per_sample"]) == 8 * int(rows[0]["kv_cache_bytes_per_sample"])
    assert len(rows[0]["prefill_s_runs"].split(";")) == 2


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_plot_file_is_a_valid_image(tiny, tmp_path, suffix):
    path = tmp_path / f"groups.{suffix}"
    result = run("--config", tiny, "--groups", "1,2,8", *FAST, "--plot", path)
    assert result.exit_code == 0, result.output
    if suffix == "png":
        from PIL import Image

        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
            img.verify()
    else:
        root = ET.parse(path).getroot()
        assert root.tag.endswith("svg")
        assert "MQA" in path.read_text() and "MHA" in path.read_text()  # the tick labels, as text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_table_and_bars_are_printed(tiny):
    result = run("--config", tiny, "--groups", "1,8", *FAST)
    assert result.exit_code == 0, result.output
    assert "1 (MQA)" in result.output and "8 (MHA)" in result.output and "1.00x" in result.output
    assert "memory bandwidth" in result.output and "time per sample" in result.output
    assert "█" in result.output


def test_list_presets_shows_each_with_its_parameter_count():
    result = run("--list-presets")
    assert result.exit_code == 0, result.output
    for name in ARCHITECTURES:
        assert name in result.output
    assert "6.74B" in result.output and "68.98B" in result.output


@pytest.mark.parametrize("name,params", [
    ("tinyllama-1.1b", 1_100_048_384), ("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
    ("llama2-70b", 68_976_648_192), ("llama3-8b", 8_030_261_248),
])
def test_presets_have_the_published_parameter_counts(name, params):
    assert ModelConfig.from_name(name).n_params() == params


def test_small_preset_is_about_200m_parameters():
    assert 180e6 < ModelConfig.from_name("small").n_params() < 230e6


def test_hf_style_config_file_is_accepted(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
                                "max_position_embeddings": 32}))
    data = bench_json(tmp_path, "--config", path, *FAST)
    assert [r["groups"] for r in data["rows"]] == [1, 2, 4]
    assert data["model"]["base_kv_heads"] == 4  # random weights: one MHA base, regrouped


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["--groups", "3"], "--groups 3 does not divide the 8 query heads"),
    (["--groups", "1,x"], "comma-separated integers"),
    (["--groups", "16"], "valid group counts: 1, 2, 4, 8"),
    (["--output-len", "1"], "--output-len must be at least 2"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--out", "results.txt"], "use .json or .csv"),
    (["--plot", "plot.pdf"], "use .png or .svg"),
])
def test_bad_options_give_one_error_line(tiny, args, message):
    assert message in _error_line(run("--config", tiny, *FAST, *args))


def test_presets_are_named_and_layers_need_a_random_model():
    assert "unknown --preset 'llama9'" in _error_line(run("--preset", "llama9"))
    assert "--layers must be at least 1" in _error_line(run("--preset", "small", "--layers", "0"))


def test_bad_config_files_give_one_error_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in _error_line(run("--config", bad))
    bad.write_text(json.dumps({**TINY, "heads": 4}))
    assert "unknown field 'heads'" in _error_line(run("--config", bad))
    bad.write_text(json.dumps({**TINY, "dim": -1}))
    assert "dim must be an integer from 1 to" in _error_line(run("--config", bad))


def test_model_flags_conflict_with_random_weight_flags(tmp_path):
    assert "do not apply to --model" in _error_line(run("--model", tmp_path, "--layers", "2"))


def test_lengths_past_a_checkpoint_context_are_an_error(tmp_path):
    make_hf_checkpoint(tmp_path, seed=1)  # max_position_embeddings 64
    assert "exceeds the model's context of 64" in _error_line(
        run("--model", tmp_path, "--input-len", "60", "--output-len", "8"))


def test_existing_out_file_needs_force(tiny, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("mine")
    assert "pass --force" in _error_line(run("--config", tiny, *FAST, "--out", out))
    assert out.read_text() == "mine"
    assert run("--config", tiny, "--groups", "8", *FAST, "--out", out, "--force").exit_code == 0
    assert json.loads(out.read_text())["rows"][0]["groups"] == 8


def test_missing_matplotlib_is_a_clear_error_before_measuring(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured although --plot cannot be drawn"))
    line = _error_line(run("--config", tiny, *FAST, "--plot", tmp_path / "p.png", "--out", tmp_path / "o.json"))
    assert "pip install 'xllama-cli[plot]'" in line
    assert list(tmp_path.iterdir()) == [tiny]


def test_out_of_memory_is_reported_per_row(tiny, tmp_path, monkeypatch):
    real = bench.generate_tokens

    def fake(model, *args, **kwargs):
        if model.config.n_kv_heads == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(bench, "generate_tokens", fake)
    data = bench_json(tmp_path, "--config", tiny, "--groups", "1,4,8", *FAST)
    status = {r["groups"]: r["status"] for r in data["rows"]}
    assert status == {1: "ok", 4: "out of memory", 8: "ok"}
    assert data["rows"][1]["time_per_sample_s"] is None and "out of memory" in data["rows"][1]["note"]


def test_cpu_allocation_failure_counts_as_out_of_memory():
    err = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000 bytes")
    assert bench.is_out_of_memory(err) and bench.is_out_of_memory(MemoryError())
    assert not bench.is_out_of_memory(RuntimeError("shape mismatch"))


def test_sizes_that_will_not_fit_are_skipped_with_a_note(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_need_bytes", lambda cfg, groups, *a: 1 << 60 if groups == 8 else 0)
    data = bench_json(tmp_path, "--config", tiny, "--groups", "1,8", *FAST)
    assert [r["status"] for r in data["rows"]] == ["ok", "skipped"]
    assert "free" in data["rows"][1]["note"] and data["rows"][0]["speedup_vs_mha"] is None


def test_a_base_model_too_large_for_memory_is_reported_not_built(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(bench, "random_model", lambda *a: pytest.fail("built a model that cannot fit"))
    data = bench_json(tmp_path, "--config", tiny, "--groups", "1,8", *FAST)
    assert [r["status"] for r in data["rows"]] == ["skipped", "skipped"]
    assert "base model needs" in data["notes"][0]


def test_ctrl_c_stops_cleanly_and_keeps_what_was_measured(tiny, tmp_path, monkeypatch):
    real, calls = bench.generate_tokens, []

    def interrupt_in_first_timed_round(model, *args, **kwargs):
        calls.append(model.config.n_kv_heads)
        if model.config.n_kv_heads == 2 and calls.count(2) == 2:  # G=2, after the warm-up round
            raise KeyboardInterrupt
        return real(model, *args, **kwargs)

    monkeypatch.setattr(bench, "generate_tokens", interrupt_in_first_timed_round)
    out = tmp_path / "out.json"
    result = run("--config", tiny, "--groups", "1,2,8", *FAST, "--out", out)
    assert result.exit_code == 130, result.output
    assert calls == [1, 2, 8, 1, 2]  # rounds: every group count warms up, then one timed run each
    assert "1 (MQA)" in result.output and "not run" in result.output
    data = json.loads(out.read_text())
    assert data["interrupted"] is True
    assert [r["status"] for r in data["rows"]] == ["ok", "not run", "not run"]
    assert data["rows"][0]["runs"] == 1 and "interrupted after 1 of 2 runs" in data["rows"][0]["note"]


def test_group_counts_are_interleaved_in_rounds(tiny, tmp_path, monkeypatch):
    """Drift in the machine's load then falls on every group count alike."""
    real, calls = bench.generate_tokens, []

    def record(model, *args, **kwargs):
        calls.append(model.config.n_kv_heads)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(bench, "generate_tokens", record)
    data = bench_json(tmp_path, "--config", tiny, "--groups", "1,8", *FAST)
    assert calls == [1, 8, 1, 8, 1, 8]
    assert len(data["memory_bandwidth"]["probes_gbs"]) == 3  # before the runs, after each timed round
