"""Peak memory of `convert`: about one source shard plus one output shard, not the whole model.

The probe is checked too: the same conversion into one output shard as big as the model must
show the whole model resident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT

MB = 1_000_000
LAYERS, DIM, HIDDEN, VOCAB = 8, 512, 1024, 512

# Runs in a fresh process: warm up (imports, allocator) on a one-layer copy, note the resident
# memory, convert the big checkpoint, report the peak resident memory above that baseline.
# Resident memory counts the pages of memory-mapped source files that were read, as it should.
# The peak is the process's VmHWM (reset at the baseline), not getrusage's ru_maxrss: Linux carries ru_maxrss over
# exec from the forking parent, so it would report pytest's own size.
PROBE = textwrap.dedent("""
    import json, sys
    from xllama_cli.convert import convert_checkpoint

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    shard_size, small, big, out = sys.argv[1:5]
    convert_checkpoint(small, out + "-warmup", groups=1, shard_size="8MB", progress=False)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS, so the import and warm-up peaks are not counted
    convert_checkpoint(big, out, groups=1, shard_size=shard_size, progress=False)
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
""")


def write_checkpoint(folder: Path, layers: int) -> list[int]:
    """An HF Llama folder of random float32 weights, one shard per layer (~10 MB each); returns shard sizes."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=DIM, intermediate_size=HIDDEN,
               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, vocab_size=VOCAB,
               max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(cfg))
    weight_map, shards = {}, []
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj.weight": (DIM, DIM), "self_attn.k_proj.weight": (DIM, DIM),
                  "self_attn.v_proj.weight": (DIM, DIM), "self_attn.o_proj.weight": (DIM, DIM),
                  "mlp.gate_proj.weight": (HIDDEN, DIM), "mlp.up_proj.weight": (HIDDEN, DIM),
                  "mlp.down_proj.weight": (DIM, HIDDEN), "input_layernorm.weight": (DIM,),
                  "post_attention_layernorm.weight": (DIM,)}
        ts = {p + k: torch.randn(s, generator=g) for k, s in shapes.items()}
        if i == 0:
            ts["model.embed_tokens.weight"] = torch.randn(VOCAB, DIM, generator=g)
            ts["model.norm.weight"] = torch.ones(DIM)
        name = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(ts, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(ts, name))
        shards.append((folder / name).stat().st_size)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shards


def peak_above_baseline(shard_size: str, small: Path, big: Path, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, shard_size, str(small), str(big), str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    return m["peak"] - m["base"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_convert_peak_memory_is_about_one_source_and_one_output_shard(tmp_path):
    shards = write_checkpoint(tmp_path / "big", LAYERS)
    write_checkpoint(tmp_path / "small", 1)
    model = sum(shards)
    # 8 shards of ~10.5 MB (the first ~11.5 MB), ~85 MB in all
    assert len(shards) == LAYERS and model > 80 * MB

    convert_peak = peak_above_baseline("8MB", tmp_path / "small", tmp_path / "big", tmp_path / "out")
    # one output shard as big as the model: the probe must see the whole model held
    whole_peak = peak_above_baseline("1GB", tmp_path / "small", tmp_path / "big", tmp_path / "whole")

    assert whole_peak > 0.8 * model, (whole_peak / MB, model / MB)
    # with 8 MB output shards convert holds one source shard (memory-mapped) plus one 8 MB output shard, with slack
    # for one pooled tensor and the allocator: far below the model's 85 MB
    bound = max(shards) + 8 * MB + 12 * MB
    assert convert_peak < bound, (convert_peak / MB, bound / MB, model / MB)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 5
