"""benchmarks/load.py on a tiny checkpoint: cold and warm rounds, first-token and memory figures."""

from __future__ import annotations

import json

from conftest import benchmark, make_hf_checkpoint


def test_tiny_run_times_the_first_token_against_one_read(tmp_path, capsys):
    load_bench = benchmark("load")
    model = tmp_path / "model"
    make_hf_checkpoint(model, num_key_value_heads=2, tokenizer=True, vocab_size=512)
    out = tmp_path / "load.json"
    assert load_bench.main(["--model", str(model), "--repeats", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["weights_bytes"] == (model / "model.safetensors").stat().st_size
    for state in ("cold", "warm"):
        m = doc["medians"][state]
        assert 0 < m["imports_s"] < m["first_token_s"] and m["read_s"] > 0
        assert m["peak_rss"] >= m["base_rss"] > 0
    assert "cold" in capsys.readouterr().out
