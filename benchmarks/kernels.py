"""Decode and prefill speed of one model under fixed CPU kernel choices, alternated in one process.

    PYTHONPATH=src python benchmarks/kernels.py --dtype float32 plain:numba:onednn plain:split:onednn
    PYTHONPATH=src python benchmarks/kernels.py --dtype bfloat16 --quantize int8 plain:int_mm:int_mm fbgemm:fbgemm:fbgemm
    PYTHONPATH=src python benchmarks/kernels.py --dtype bfloat16 fbgemm-fp16:fbgemm:fbgemm@weights fbgemm-fp16:fbgemm:fbgemm
    PYTHONPATH=src python benchmarks/kernels.py --dtype bfloat16 fbgemm-fp16:fbgemm:fbgemm@separate fbgemm-fp16:fbgemm:fbgemm
    PYTHONPATH=src python benchmarks/kernels.py --dtype bfloat16 --quantize int4 int4pack:int4pack:int4pack int4pack:int4pack:int4pack@fused
    PYTHONPATH=src python benchmarks/kernels.py --dtype bfloat16 --quantize int4 vnni:avx2:widen-bf16@fused vnni:avx2:widen-bf16@block
        [--prompt-len 128] [--new-tokens 64] [--repeats 5] [--batch 1] [--model DIR] [--json PATH]

linear.Tuner times each product alone, one after another. In a decode step, though, the products
alternate with the step's other ops, and a product can slow those (numba's loops for bf16 and int8
weights did, though as fast as fbgemm's alone: see gemv.py). This benchmark settles such cases:
every choice (LAYOUT:FEW:MANY, as linear.Choice names them; the first is the reference) is given to
every layer of its own copy of the model (linear.fixed, checked against F.linear like any other),
then the copies generate greedily in turn, round by round after one warm-up each. A copy is built as
the default path builds it (loading.for_inference): float32 activations beside half-precision and
quantized weights (loading.cpu_activations), each block's q, k and v (and gate and up) as one
product (fuse.py). `@weights` after a choice keeps the activations in the weights' own dtype;
`@separate` keeps one product per projection. `@fused` gives the copy's blocks cpu_attention.py's
fused decode step (RoPE, cache write and attention in one loop), unmeasured; `@block` gives them
cpu_block.py's block step (a block's norms, products, attention and sums in one numba call) and the
fused attention step it needs, unmeasured. Prints the median decode ms a step and prefill tok/s
of each, and its ratio to the first choice's (the median of the per-round ratios: neighbours share
the drift). The model is decode.py's random bench-220m (or --model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import decode as decode_bench  # noqa: E402 - benchmarks/decode.py, beside this file
from xllama_cli import __version__, report  # noqa: E402
from xllama_cli.checkpoint import open_checkpoint  # noqa: E402
from xllama_cli.cpu_attention import give_fused_step  # noqa: E402
from xllama_cli.cpu_block import give_block_step  # noqa: E402
from xllama_cli.errors import XllamaError  # noqa: E402
from xllama_cli.generation import generate_tokens  # noqa: E402
from xllama_cli.linear import FLOAT_KINDS, Choice, CpuLinear, Tuner, fixed  # noqa: E402
from xllama_cli.loading import load_model, use_cpu_path  # noqa: E402
from xllama_cli.machine import machine_info  # noqa: E402
from xllama_cli.quantize import INT4, INT8, quantize_model  # noqa: E402
from xllama_cli.sampling import Sampling  # noqa: E402
from xllama_cli.writer import atomic_write  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One copy of the model: its layers' kernel choice, and where it departs from the default
    path: activations in the weights' own dtype, one product per projection; the fused attention
    step, and the block step (cpu_block.py, with the fused attention step), given whether or not
    the default path would measure them faster."""

    choice: Choice
    own_dtype: bool = False
    separate: bool = False
    fused: bool = False
    block: bool = False

    def __str__(self) -> str:
        tags = (" @weights" if self.own_dtype else "", " @separate" if self.separate else "",
                " @fused" if self.fused else "", " @block" if self.block else "")
        return f"{self.choice}{''.join(tags)}"


TAGS = ("weights", "separate", "fused", "block")


def parse_choice(text: str) -> Variant:
    body, *tags = text.split("@")
    parts = body.split(":")
    if len(parts) != 3 or not all(parts) or not set(tags) <= set(TAGS) or len(set(tags)) != len(tags):
        raise argparse.ArgumentTypeError(f"expected LAYOUT:FEW:MANY, then any of @weights, @separate, @fused, @block, "
                                         f"got {text!r}")
    for step in ("fused", "block"):
        if {"separate", step} <= set(tags):
            raise argparse.ArgumentTypeError(f"@{step} takes q, k and v from one product, which @separate splits: {text!r}")
    return Variant(Choice(*parts), "weights" in tags, "separate" in tags, "fused" in tags, "block" in tags)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("choices", nargs="+", type=parse_choice,
                    help="LAYOUT:FEW:MANY[@weights][@separate][@fused][@block] (activations in the weights' dtype; a "
                         "product per projection; the fused attention step; the block step and the fused attention "
                         "step); the first is the reference")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--quantize", choices=("int8", "int4"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds, after one warm-up")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--model", type=Path, help=f"an HF folder instead of the random {decode_bench.ARCHITECTURE} model")
    ap.add_argument("--json", type=Path, help="write every figure here")
    decode_bench.add_shape_flags(ap)
    a = ap.parse_args(argv)
    decode_bench.check_counts(ap, a, ("batch", "prompt_len", "new_tokens", "repeats", "threads"))
    if len(a.choices) < 2:
        ap.error("give at least two choices: a reference and one to compare with it")
    if a.dtype != "float32" and any((v.fused or v.block) and v.own_dtype for v in a.choices):
        ap.error(f"@fused and @block need float32 activations, which @weights takes away from {a.dtype} weights")
    kind = {"int8": INT8, "int4": INT4}.get(a.quantize) or FLOAT_KINDS[getattr(torch, a.dtype)]
    for c in (v.choice for v in a.choices):
        layout = kind.layout(c.layout)
        if layout is None or None in (layout.product(c.few), layout.product(c.many)):
            ap.error(f"{c} is no choice for {kind.name} weights; they have "
                     + "; ".join(f"{lay.name}: {', '.join(p.name for p in lay.products)}" for lay in kind.layouts))
    return a


def main(argv: list[str] | None = None) -> int:
    return decode_bench.exit_status(run, parse_args(argv))


def build(path: Path, a: argparse.Namespace, variant: Variant) -> torch.nn.Module:
    """The model with every linear layer on the variant's choice (those of another kind, such as
    int4's int8 head, on the kernels measured fastest), in the activations' dtype of the default
    path (loading.use_cpu_path) or its weights'; an error where the choice serves none."""
    choice = variant.choice
    model = load_model(path, device="cpu", dtype=a.dtype, pack=False)
    if a.quantize:
        model = quantize_model(model, a.quantize)
    tuner, given = Tuner(), fixed(choice)

    def choose(spec, kind, layers):  # the choice, else (another kind's layers) the tuner's
        picked = given(spec, kind, layers)
        return picked if picked[0] is not None else tuner.choose(spec, kind, layers)

    use_cpu_path(model, choose, fuse=not variant.separate, float32=not variant.own_dtype)
    if not any(isinstance(m, CpuLinear) and m.choice == choice for m in model.modules()):
        raise XllamaError(f"{choice} serves none of the model's layers here (unknown, missing or wrong)")
    if (variant.fused or variant.block) and not give_fused_step(model):
        raise XllamaError(f"the fused attention step serves none of {variant}'s layers here (it needs numba, q, k and "
                          "v stacked and a float32 cache)")
    if variant.block and not give_block_step(model):
        raise XllamaError(f"the block step serves none of {variant}'s blocks here (it needs every product of a block "
                          "to be a numba loop: cpu_block.product_loop)")
    return model


def run(a: argparse.Namespace) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="xllama-kernels-") as tmp:
        path = a.model or decode_bench.write_random_model(a, Path(tmp))
        cfg = open_checkpoint(path).config
        decode_bench.check_context(cfg, a.prompt_len, a.new_tokens)  # before any model is built
        models = [build(path, a, c) for c in a.choices]
    vocab = cfg.vocab_size
    prompts = torch.randint(0, vocab, (a.batch, a.prompt_len),
                            generator=torch.Generator().manual_seed(decode_bench.SEED)).tolist()
    runs: list[dict[str, list[float]]] = [{"prefill_s": [], "decode_s": []} for _ in models]
    with report.progress((1 + a.repeats) * len(models), "kernel choices", unit="runs") as advance:
        for r in range(1 + a.repeats):  # round 0 warms up
            for i, model in enumerate(models):
                g = generate_tokens(model, prompts, a.new_tokens, Sampling(0.0))
                if r:
                    runs[i]["prefill_s"].append(g.stats.prefill_s)
                    runs[i]["decode_s"].append(g.stats.decode_s / (a.new_tokens - 1))
                advance(1, f"{'warm-up' if r == 0 else f'round {r}'}, {a.choices[i]}")
    rows = [summarize(a, c, runs[i], runs[0]) for i, c in enumerate(a.choices)]
    show(a, rows)
    if a.json:
        doc = {"xllama_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(torch.device("cpu")), "model": str(a.model or "random"),
               "settings": {k: v for k, v in vars(a).items() if k not in ("choices", "json", "model")},
               "rows": rows}
        atomic_write(a.json, lambda p: p.write_text(json.dumps(doc, indent=2, default=str) + "\n"))
    return 0


def summarize(a: argparse.Namespace, variant: Variant, mine: dict, ref: dict) -> dict:
    return {"choice": str(variant),
            "decode_ms_per_step": statistics.median(mine["decode_s"]) * 1e3,
            "prefill_tok_s": a.batch * a.prompt_len / statistics.median(mine["prefill_s"]),
            "decode_speed_vs_first": statistics.median(r / m for m, r in zip(mine["decode_s"], ref["decode_s"])),
            "prefill_speed_vs_first": statistics.median(r / m for m, r in zip(mine["prefill_s"], ref["prefill_s"])),
            "decode_ms_runs": [s * 1e3 for s in mine["decode_s"]],
            "prefill_ms_runs": [s * 1e3 for s in mine["prefill_s"]]}


def show(a: argparse.Namespace, rows: list[dict]) -> None:
    title = (f"{a.dtype}{' ' + a.quantize if a.quantize else ''}, batch {a.batch}, prompt {a.prompt_len}, "
             f"{a.new_tokens} new tokens; medians of {a.repeats} rounds")
    report.table(["choice (layout: few / many)", "decode\nms/step", "x first", "prefill\ntok/s", "x first"],
                 [[r["choice"], f"{r['decode_ms_per_step']:.2f}", f"{r['decode_speed_vs_first']:.2f}x",
                   f"{r['prefill_tok_s']:.0f}", f"{r['prefill_speed_vs_first']:.2f}x"] for r in rows],
                 title=title)


if __name__ == "__main__":
    sys.exit(main())
