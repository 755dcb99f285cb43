#!/usr/bin/env python3
"""The GQA paper's quality study (figures 3-5, table 1 in spirit) on xllama's demo model.

Held-out perplexity of the multi-head demo model converted to GQA-4, GQA-2 and MQA
(a) right after conversion by `mean`, `first` and `random` (the paper's figure 4), and
(b) after uptraining the mean-converted models for alpha = 5% and 10% of the demo's
pre-training steps on the demo's training split (the paper's figure 5). The MHA model is
uptrained the same way as a control: it tells how much of a gain is just more training.

    python scripts/quality_study.py --corpus ../shared/corpus/grimm_pg2591.txt --out benchmarks/results

Prints a table; writes quality_study.json and quality_study.png (needs matplotlib) to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_demo import grimm_tales, split  # noqa: E402  (the demo's own split: same held-out tales)

from xllama_cli.cli import DEMO_MODEL  # noqa: E402
from xllama_cli.convert import convert_checkpoint  # noqa: E402
from xllama_cli.evaluate import evaluate_text  # noqa: E402
from xllama_cli.loading import load_model  # noqa: E402
from xllama_cli.tokenizer import load_tokenizer  # noqa: E402
from xllama_cli.train import TrainConfig, encode_text, train  # noqa: E402

LAYOUTS = [("MHA", 8), ("GQA-4", 4), ("GQA-2", 2), ("MQA", 1)]
METHODS = ["mean", "first", "random"]


def pretraining_steps() -> int:
    text = (DEMO_MODEL / "TRAINING.md").read_text()
    return int(re.search(r"--steps (\d+)", text).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpus/grimm_pg2591.txt"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--alphas", default="0.05,0.10")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    heldout = DEMO_MODEL / "heldout.txt"
    tok = load_tokenizer(DEMO_MODEL)
    train_text, _ = split(grimm_tales(args.corpus.read_text(encoding="utf-8-sig")))
    train_ids = encode_text(tok, train_text)
    base_steps = pretraining_steps()
    alphas = [float(a) for a in args.alphas.split(",")]
    rows: list[dict] = []

    def ppl(model) -> float:
        return evaluate_text(model, tok, heldout, progress=False).perplexity

    with tempfile.TemporaryDirectory() as tmp:
        for name, g in LAYOUTS:
            for method in (["-"] if g == 8 else METHODS):
                folder = DEMO_MODEL
                if g != 8:
                    folder = Path(tmp) / f"{name}-{method}"
                    convert_checkpoint(DEMO_MODEL, folder, groups=g, method=method, seed=args.seed, progress=False)
                model = load_model(folder, device="cpu", dtype="float32")
                rows.append(dict(layout=name, kv_heads=g, method=method, alpha=0.0, steps=0, perplexity=ppl(model)))
                print(f"{name:6} {method:6} alpha 0     perplexity {rows[-1]['perplexity']:.2f}", flush=True)
                if method not in ("mean", "-"):
                    continue
                for alpha in alphas:
                    steps = max(1, round(alpha * base_steps))
                    model = load_model(folder, device="cpu", dtype="float32")
                    cfg = TrainConfig(steps=steps, lr=args.lr, batch=args.batch, context=model.config.max_seq_len,
                                      seed=args.seed, warmup=max(1, steps // 20), min_lr_ratio=0.1)
                    t0 = time.time()
                    train(model, train_ids, cfg)
                    rows.append(dict(layout=name, kv_heads=g, method=method, alpha=alpha, steps=steps,
                                     perplexity=ppl(model), seconds=round(time.time() - t0, 1)))
                    print(f"{name:6} {method:6} alpha {alpha:<5} perplexity {rows[-1]['perplexity']:.2f} "
                          f"({steps} steps, {rows[-1]['seconds']} s)", flush=True)

    result = {"model": "xllama demo (Grimm, 8 heads)", "heldout": str(heldout), "pretraining_steps": base_steps,
              "uptraining": {"lr": args.lr, "batch": args.batch, "context": 256, "seed": args.seed},
              "torch": torch.__version__, "rows": rows}
    (args.out / "quality_study.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, alphas)
    plot(rows, alphas, args.out / "quality_study.png")


def print_table(rows: list[dict], alphas: list[float]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="held-out perplexity of the demo model (lower is better)")
    cols = ["layout", "KV heads", "mean", "first", "random"] + [f"mean + uptrain {a:.0%}" for a in alphas]
    for c in cols:
        t.add_column(c, justify="right")
    for name, g in LAYOUTS:
        get = lambda m, a=0.0: next((f"{r['perplexity']:.2f}" for r in rows
                                     if r["layout"] == name and r["method"] == m and r["alpha"] == a), "")
        if g == 8:
            t.add_row(name, str(g), get("-"), "", "", *[get("-", a) for a in alphas])
        else:
            t.add_row(name, str(g), get("mean"), get("first"), get("random"), *[get("mean", a) for a in alphas])
    Console().print(t)


def plot(rows: list[dict], alphas: list[float], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n, g in LAYOUTS if g != 8]
    mha = next(r["perplexity"] for r in rows if r["layout"] == "MHA" and r["alpha"] == 0)
    for i, m in enumerate(METHODS):
        vals = [next(r["perplexity"] for r in rows if r["layout"] == n and r["method"] == m and r["alpha"] == 0) for n in names]
        a.bar([x + (i - 1) * 0.27 for x in range(len(names))], vals, width=0.27, label=m)
    a.axhline(mha, color="k", ls="--", label="MHA (no conversion)")
    a.set_xticks(range(len(names)), names)
    a.set_yscale("log")
    a.set_ylabel("held-out perplexity")
    a.set_title("after conversion (paper fig. 4)")
    a.legend()
    xs = [0.0] + alphas
    for n, g in LAYOUTS:
        m = "-" if g == 8 else "mean"
        b.plot([x * 100 for x in xs], [next(r["perplexity"] for r in rows if r["layout"] == n and r["method"] == m
                                            and r["alpha"] == x) for x in xs], marker="o", label=n)
    b.set_xlabel("uptraining steps, % of pre-training (alpha)")
    b.set_ylabel("held-out perplexity")
    b.set_yscale("log")
    b.set_title("after uptraining, mean-pooled (paper fig. 5)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
