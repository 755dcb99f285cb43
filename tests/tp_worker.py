"""Started by tests/test_parallel.py under torchrun: each rank loads every case of a spec and saves
what it computed (logits, greedy tokens, sampled tokens, its parameter count) to OUT.RANK.pt."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from xllama_cli.errors import XllamaError
from xllama_cli.generation import generate_tokens
from xllama_cli.loading import load
from xllama_cli.sampling import Sampling


def run_case(case: dict) -> dict:
    opts = {k: case[k] for k in ("attn", "groups", "rope", "rope_factor", "method", "quantize", "compile", "decode_batch")
            if k in case}
    try:
        loaded = load(case["model"], device="cpu", dtype=case.get("dtype", "float32"), **opts)
    except XllamaError as e:
        return {"error": str(e)}
    model, engine = loaded.model, {"step": loaded.step, "tp": loaded.tp}
    prompts = case["prompts"]
    out = {
        "params": sum(p.numel() for p in model.parameters()),
        "local": (model.config.n_heads, model.config.n_kv_heads, model.config.hidden_dim),
        "kernels": str(getattr(model.model.layers[0].mlp.down_proj, "choice", "")),  # linear.CpuLinear's
        "tokens": generate_tokens(model, prompts, case["n"], **engine).tokens,
    }
    if case.get("sample"):  # unseeded: each rank's own generator differs, only the broadcast keeps them together
        out["sampled"] = generate_tokens(model, prompts, 12, Sampling(temperature=1.0), **engine).tokens
    with torch.no_grad():
        out["logits"] = model(torch.tensor([case["logits_tokens"]]))
    return out


def main(spec: Path, out: Path) -> None:
    cases = json.loads(spec.read_text())
    results = {c["name"]: run_case(c) for c in cases}
    torch.save(results, f"{out}.{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
