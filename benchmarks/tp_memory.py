"""Memory per rank under tensor parallelism against one process, on a random HF checkpoint.

    python benchmarks/tp_memory.py [--ranks 2] [--dim 1024 --layers 8 ...]

Writes a random float32 Llama to a temporary folder twice (HF safetensors, and Meta split
into N consolidated.NN.pth shards), loads it and generates a few tokens in one process and then
on N CPU ranks (torchrun, gloo), and prints per process: parameter bytes, resident memory (RSS)
after `import torch` and xllama, after loading, after generating, and its peak (ru_maxrss).
The baseline is taken after PyTorch's one-time meta-device setup (a fixed cost in every process,
with or without ranks: the first nn.Embedding built on the meta device loads its meta kernels).
Every process is started from a small one, as ru_maxrss carries over across exec.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(model_dir: str, out: str) -> None:
    """One process (or one rank): load, generate 8 tokens, write what it used to OUT[.RANK].json."""
    import torch

    from xllama_cli import load_model
    from xllama_cli.generation import generate_tokens

    with torch.device("meta"):
        torch.nn.Embedding(2, 2)  # the one-time meta-device setup load_model would pay first
    base = rss_mb()
    m = load_model(model_dir, device="cpu", dtype="float32")
    loaded = rss_mb()
    generate_tokens(m, [[1, 5, 9, 13]], 8)
    done = rss_mb()
    params = sum(p.numel() * p.element_size() for p in m.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rank = os.environ.get("RANK")
    Path(out + (f".{rank}" if rank else "") + ".json").write_text(json.dumps(
        dict(rank=rank, params_mb=params / 2**20, base_mb=base, loaded_mb=loaded, done_mb=done, peak_mb=peak)))
    del torch


META = {"embed_tokens": ("tok_embeddings", 1), "norm": ("norm", None), "lm_head": ("output", 0),
        "q_proj": ("attention.wq", 0), "k_proj": ("attention.wk", 0), "v_proj": ("attention.wv", 0),
        "o_proj": ("attention.wo", 1), "gate_proj": ("feed_forward.w1", 0), "up_proj": ("feed_forward.w3", 0),
        "down_proj": ("feed_forward.w2", 1), "input_layernorm": ("attention_norm", None),
        "post_attention_layernorm": ("ffn_norm", None)}


def make_checkpoints(hf: Path, meta: Path, shards: int, a: argparse.Namespace) -> None:
    """The same random weights as an HF folder and as a Meta folder of `shards` shards."""
    import torch
    from safetensors.torch import save_file

    from xllama_cli.config import ModelConfig
    from xllama_cli.model import Transformer

    cfg = ModelConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                      hidden_dim=a.hidden, vocab_size=a.vocab, max_seq_len=256)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in Transformer(cfg).state_dict().items()}
    hf.mkdir(parents=True)
    save_file(state, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(cfg.to_hf()))
    parts: list[dict] = [{} for _ in range(shards)]
    for name, t in state.items():
        *_, kind, _w = name.split(".")
        layer = name.split(".")[2] if ".layers." in name else None
        meta_kind, dim = META[kind]
        if kind in ("q_proj", "k_proj"):  # HF half-split rows -> Meta interleaved pairs, per head
            n = t.shape[0] // cfg.head_dim
            t = t.view(n, 2, cfg.head_dim // 2, -1).transpose(1, 2).reshape(t.shape)
        key = (f"layers.{layer}." if layer else "") + meta_kind + ".weight"
        pieces = [t] * shards if dim is None else t.chunk(shards, dim)
        for part, piece in zip(parts, pieces):
            part[key] = piece.clone()
    meta.mkdir(parents=True)
    for i, part in enumerate(parts):
        torch.save(part, meta / f"consolidated.{i:02d}.pth")
    (meta / "params.json").write_text(json.dumps(dict(dim=a.dim, n_layers=a.layers, n_heads=a.heads,
                                                      n_kv_heads=a.kv_heads, norm_eps=1e-5, vocab_size=a.vocab)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--measure", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        return measure(*a.measure)
    if a.make:
        return make_checkpoints(Path(a.make) / "hf", Path(a.make) / "meta", a.ranks, a)

    from rich.console import Console
    from rich.table import Table

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    table = Table(title=f"Memory per process, random float32 Llama (dim {a.dim}, {a.layers} layers, "
                        f"{a.heads} heads / {a.kv_heads} KV, FFN {a.hidden}, vocab {a.vocab}), CPU; "
                        "MiB, and the ratio to one process (RSS counts above the RSS after import)")
    for col in ("checkpoint", "process", "parameters", "RSS after import", "+ loaded", "+ after generate", "+ peak"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("measure", "make")]
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make", tmp, *sizes], env=env, check=True)
        for fmt in ("hf", "meta"):
            me = [str(Path(__file__).resolve()), "--measure", f"{tmp}/{fmt}"]
            subprocess.run([sys.executable, *me, f"{tmp}/{fmt}-one"], env=env, check=True)
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={a.ranks}", *me, f"{tmp}/{fmt}-tp"], env=env, check=True,
                           stderr=subprocess.DEVNULL)
            rows = [json.loads(Path(f"{tmp}/{fmt}-one.json").read_text())]
            rows += [json.loads(Path(f"{tmp}/{fmt}-tp.{r}.json").read_text()) for r in range(a.ranks)]
            one = rows[0]
            label = "HF safetensors" if fmt == "hf" else f"Meta, {a.ranks} shards"
            for r in rows:
                def cell(key: str) -> str:
                    base = 0 if key == "params_mb" else r["base_mb"]
                    ref = one[key] - (0 if key == "params_mb" else one["base_mb"])
                    return f"{r[key] - base:.0f} ({(r[key] - base) / ref:.2f})"
                who = "1 process" if r["rank"] is None else f"rank {r['rank']} of {a.ranks}"
                # no ratio for "loaded": one process keeps the file mapped and reads it lazily
                table.add_row(label, who, cell("params_mb"), f"{r['base_mb']:.0f}", f"{r['loaded_mb'] - r['base_mb']:.0f}",
                              cell("done_mb"), cell("peak_mb"))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
