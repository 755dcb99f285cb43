"""Prefill and decode speed of xllama against transformers on the same weights, in one process.

    PYTHONPATH=src python benchmarks/decode.py [--dtype float32|bfloat16] [--batch 1]
        [--prompt-len 128[,1024]] [--new-tokens 128] [--repeats 3] [--model PATH] [--json PATH]
        [--threads N] [--quantize int8] [--compile]

Builds the 220M-parameter `bench-220m` Llama (config.ARCHITECTURES) with random weights (or
takes --model), saves it once as an HF folder, and loads that folder with `xllama_cli.loading.load`
and with transformers' `LlamaForCausalLM` (sdpa). Both decode greedily with their KV cache, no EOS stop, on the same
random prompt, interleaved (xllama, transformers, bandwidth probe; per round) after one warm-up
each. Prints medians over the rounds: prefill and decode tok/s, the bytes a decode step must read
per second, that against the probe's copy bandwidth, and the ratios xllama / transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from rich import box
from rich.table import Table

from xllama_cli import __version__, report
from xllama_cli.accounting import kv_read_bytes_per_step, weight_bytes_per_step
from xllama_cli.build import expected_shapes
from xllama_cli.checkpoint import open_checkpoint
from xllama_cli.config import ModelConfig
from xllama_cli.errors import XllamaError
from xllama_cli.generation import generate_tokens
from xllama_cli import loading
from xllama_cli.loading import Loaded, resolve_device, resolve_dtype
from xllama_cli.machine import bandwidth_probe_bytes, machine_info, measure_bandwidth
from xllama_cli.sampling import Sampling
from xllama_cli.writer import atomic_write, write_safetensors

SYSTEMS = ("xllama", "transformers")
ARCHITECTURE = "bench-220m"  # config.ARCHITECTURES: the random model's shape
SEED = 0
INIT_STD = 0.02


def random_checkpoint(cfg: ModelConfig, folder: Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> None:
    """Random weights (normal, std 0.02; norms 1) written as config.json + model.safetensors; drawn
    on `device` (a GPU draws a 7B model's in a moment; the CPU takes a minute), seeded there."""
    names = expected_shapes(cfg)
    gen = torch.Generator(device).manual_seed(SEED)
    state = {n: (torch.ones(s) if n.endswith("norm.weight")
                 else torch.empty(s, device=device).normal_(0, INIT_STD, generator=gen)).to("cpu", dtype)
             for n, s in names.items()}
    write_safetensors(folder / "model.safetensors", state)
    (folder / "config.json").write_text(json.dumps({**cfg.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))


def step_bytes(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, elsize: int, int8: bool) -> int:
    """Bytes one decode step reads: every weight once (B rows of the embedding), plus the KV cache
    attended over (mean over the steps)."""
    return (weight_bytes_per_step(cfg, cfg.n_kv_heads, batch, elsize, int8)
            + kv_read_bytes_per_step(cfg, cfg.n_kv_heads, prompt_len, new_tokens, batch, elsize))


def time_xllama(ours: Loaded, prompts: torch.Tensor, n: int) -> tuple[float, float, list[list[int]]]:
    """xllama's own generation path; its stats split prefill (with the first token) and decode."""
    g = generate_tokens(ours.model, prompts.tolist(), n, Sampling(0.0), eos_ids=None, step=ours.step)
    return g.stats.prefill_s, g.stats.decode_s, g.tokens


@torch.inference_mode()
def time_transformers(model, prompts: torch.Tensor, n: int) -> tuple[float, float, list[list[int]]]:
    """Greedy decode with transformers' KV cache, timed the way xllama's generation times itself."""
    sync = torch.cuda.synchronize if prompts.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1)
    sync()
    t1 = time.perf_counter()
    tokens = [nxt]
    for _ in range(n - 1):
        out = model(input_ids=nxt[:, None], cache=out.cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
    sync()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.stack(tokens, 1).tolist()


def compare_tokens(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Rows whose greedy tokens differ, and the first position where any row differs."""
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None if len(x) == len(y) else min(len(x), len(y)))
              for x, y in zip(ours, theirs)]
    differ = [f for f in firsts if f is not None]
    return {"identical": not differ, "rows": len(ours), "rows_differing": len(differ),
            "first_difference": min(differ) if differ else None}


def summarize(runs: dict[str, list[float]], batch: int, prompt_len: int, steps: int, nbytes: int,
              bandwidth: float) -> dict:
    """Medians and spreads (half the range over the rounds, % of the median) of one system's runs."""
    prefill = [batch * prompt_len / s for s in runs["prefill_s_runs"]]
    decode = [batch * steps / s for s in runs["decode_s_runs"]]
    med = statistics.median(decode)
    gbs = nbytes * med / batch / 1e9  # a step makes `batch` tokens
    return {**runs, "prefill_tok_s": statistics.median(prefill), "decode_tok_s": med,
            "prefill_spread_pct": 50 * (max(prefill) - min(prefill)) / statistics.median(prefill),
            "decode_spread_pct": 50 * (max(decode) - min(decode)) / med,
            "decode_bytes_per_step": nbytes, "decode_gbs": gbs, "bandwidth_fraction": gbs / bandwidth}


def ratios(x: dict, t: dict) -> dict:
    """xllama / transformers, the median over rounds of each round's ratio (neighbours share the drift)."""
    def per_round(key: str) -> float:
        return statistics.median(b / a for a, b in zip(x[key], t[key]))  # time ratio = speed ratio inverted
    return {"prefill": per_round("prefill_s_runs"), "decode": per_round("decode_s_runs")}


def parse_lengths(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="default: float32, or bfloat16 with --quantize (int8 weights compute in it)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=parse_lengths, default=[128], help="tokens; a list (128,1024) runs each")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds, after one warm-up")
    ap.add_argument("--model", type=Path, help=f"an HF folder to load instead of the random {ARCHITECTURE} model")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quantize", choices=("int8",), help="xllama only: weight-only int8")
    ap.add_argument("--compile", action="store_true",
                    help="xllama only: the compiled decode step (generation.compile_decode)")
    add_shape_flags(ap)
    a = ap.parse_args(argv)
    a.dtype = a.dtype or ("bfloat16" if a.quantize else "float32")
    check_counts(ap, a, ("batch", "new_tokens", "repeats", "threads"))
    return a


def add_shape_flags(ap: argparse.ArgumentParser) -> None:
    """The random model's shape as hidden flags (tests shrink it; `random_config` reads them), and
    argparse's errors as one line on stderr and exit 2."""
    base = ModelConfig.from_name(ARCHITECTURE)
    for flag, default in (("dim", base.dim), ("layers", base.n_layers), ("heads", base.n_heads),
                          ("kv-heads", base.n_kv_heads), ("ffn", base.hidden_dim), ("vocab", base.vocab_size),
                          ("max-seq-len", base.max_seq_len)):
        ap.add_argument(f"--{flag}", type=int, default=default, help=argparse.SUPPRESS)
    ap.error = lambda message: (report.error(message), sys.exit(2))  # type: ignore[method-assign]


def check_counts(ap: argparse.ArgumentParser, a: argparse.Namespace, names: tuple[str, ...]) -> None:
    """The counts `names` are positive where given, and --new-tokens is at least 2."""
    for name in names:
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if a.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the first comes from the prefill)")


def random_config(a: argparse.Namespace) -> ModelConfig:
    """The random model's configuration: ARCHITECTURE with the shape flags' sizes."""
    return ModelConfig.from_name(ARCHITECTURE).replace(
        dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, head_dim=0,
        hidden_dim=a.ffn, vocab_size=a.vocab, max_seq_len=a.max_seq_len)


def main(argv: list[str] | None = None) -> int:
    return exit_status(run, parse_args(argv))


def exit_status(run: Callable[[argparse.Namespace], int], a: argparse.Namespace) -> int:
    """run(a)'s exit status; an XllamaError is one error line on stderr and status 2."""
    try:
        return run(a)
    except XllamaError as e:
        report.error(str(e))
        return 2


def write_random_model(a: argparse.Namespace, folder: Path) -> Path:
    """The random model (`random_config`) written into `folder` as an HF folder, said on stderr."""
    cfg = random_config(a)
    report.info(f"writing a random {cfg.n_params() / 1e6:.1f}M-parameter model to {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    random_checkpoint(cfg, folder)
    return folder


def check_context(cfg: ModelConfig, prompt_len: int, new_tokens: int) -> None:
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise XllamaError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the "
                          f"model's context of {cfg.max_seq_len}")


def run(a: argparse.Namespace) -> int:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one on stderr

    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()[0]  # before our own work: what else keeps the CPUs busy
    if load >= 1.0:
        report.info(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs before the run; other processes "
                    "compete for cores and memory bandwidth, so the figures are unreliable")
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device, a.quantize)  # int8 against transformers in bfloat16
    with tempfile.TemporaryDirectory(prefix="xllama-decode-") as tmp:
        path = a.model or write_random_model(a, Path(tmp))
        cfg = open_checkpoint(path).config
        check_context(cfg, max(a.prompt_len), a.new_tokens)
        report.info("loading the model with xllama and with transformers")
        ours = loading.load(path, device=str(device), dtype=a.dtype, quantize=a.quantize, compile=a.compile,
                            decode_batch=a.batch)
        compile_s = 0.0 if a.compile else None  # the warm-up run's compile_s, below
        hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        probe = bandwidth_probe_bytes(device)
        probes = [measure_bandwidth(device, probe)]
        results = []
        total = len(a.prompt_len) * (1 + a.repeats) * 2
        with report.progress(total, "decode benchmark", unit="runs") as advance:
            for plen in a.prompt_len:
                prompts = torch.randint(0, cfg.vocab_size, (a.batch, plen), device=device,
                                        generator=torch.Generator(device).manual_seed(SEED))
                runs = {s: {"prefill_s_runs": [], "decode_s_runs": []} for s in SYSTEMS}
                toks: dict[str, list[list[int]]] = {}
                for r in range(1 + a.repeats):  # round 0 is the warm-up (and, with --compile, the compile)
                    for system in SYSTEMS:
                        t0 = time.perf_counter()
                        fn = time_xllama if system == "xllama" else time_transformers
                        p, d, toks[system] = fn(ours if system == "xllama" else hf, prompts, a.new_tokens)
                        if r == 0 and system == "xllama" and a.compile:
                            compile_s += time.perf_counter() - t0
                        if r > 0:
                            runs[system]["prefill_s_runs"].append(p)
                            runs[system]["decode_s_runs"].append(d)
                        advance(1, f"prompt {plen}, {'warm-up' if r == 0 else f'round {r}'}, {system}")
                    if r > 0:
                        probes.append(measure_bandwidth(device, probe))
                results.append((plen, runs, compare_tokens(toks["xllama"], toks["transformers"])))
    bandwidth = statistics.median(probes)
    elsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for plen, runs, greedy in results:
        figs = {s: summarize(runs[s], a.batch, plen, a.new_tokens - 1, step_bytes(
                    cfg, a.batch, plen, a.new_tokens, elsize, s == "xllama" and a.quantize == "int8"), bandwidth)
                for s in SYSTEMS}
        rows.append({"prompt_len": plen, "systems": figs, "ratios": ratios(figs["xllama"], figs["transformers"]),
                     "greedy": greedy})
    show(rows, a, cfg, bandwidth, probe, len(probes), compile_s)
    if a.json:
        doc = {"xllama_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": {**machine_info(device), "load_average_before": load}, "device": str(device), "dtype": a.dtype,
               "transformers": __import__("transformers").__version__,
               "model": {"source": str(a.model or "random"), "params": cfg.n_params(), "config": cfg.to_hf(),
                         "init_std": None if a.model else INIT_STD, "seed": SEED},
               "settings": {"batch": a.batch, "new_tokens": a.new_tokens, "decode_steps": a.new_tokens - 1,
                            "repeats": a.repeats, "warmup_runs": 1, "threads": torch.get_num_threads(),
                            "quantize": a.quantize, "compile": a.compile},
               "compile_s": compile_s,
               "memory_bandwidth": {"gbs": bandwidth, "probes_gbs": probes, "copy_bytes": probe,
                                    "method": "tensor copy, read + write bytes / time; one probe before the runs "
                                              "and one per round; gbs is their median"},
               "runs": rows}
        atomic_write(a.json, lambda p: p.write_text(json.dumps(doc, indent=2) + "\n"))
    return 0


def show(rows: list[dict], a: argparse.Namespace, cfg: ModelConfig, bandwidth: float, probe: int, n_probes: int,
         compile_s: float | None) -> None:
    """The results table on stdout: one row per system and prompt length, then the ratios."""
    xl = "xllama" + (" int8" if a.quantize else "") + (" compiled" if a.compile else "")
    table = Table(box=box.SIMPLE_HEAD, title=f"{cfg.n_params() / 1e6:.1f}M params, {a.dtype}, batch {a.batch}, {a.new_tokens} new "
                        f"tokens, {torch.get_num_threads()} threads; medians of {a.repeats} rounds",
                  caption=f"transformers {__import__('transformers').__version__}, sdpa. probe: copy of {probe >> 20} "
                          f"MiB, median of {n_probes}. ±: half the range over rounds; ratios: median of the "
                          "per-round ratios")
    for col in ("prompt", "system", "prefill tok/s", "decode tok/s", "GB/s", "of probe"):
        table.add_column(col, justify="left" if col == "system" else "right", no_wrap=True)
    for row in rows:
        for s in SYSTEMS:
            f = row["systems"][s]
            table.add_row(str(row["prompt_len"]), xl if s == "xllama" else "transformers",
                          f"{f['prefill_tok_s']:.0f} ±{f['prefill_spread_pct']:.0f}%",
                          f"{f['decode_tok_s']:.1f} ±{f['decode_spread_pct']:.0f}%",
                          f"{f['decode_gbs']:.1f}", f"{100 * f['bandwidth_fraction']:.0f}%")
        r = row["ratios"]
        table.add_row("", "xllama / transf.", f"{r['prefill']:.2f}x", f"{r['decode']:.2f}x", "", "",
                      end_section=True)
    report.out.print(table)
    report.out.print(f"probe bandwidth: {bandwidth:.1f} GB/s")
    if compile_s is not None:
        report.out.print(f"compile (the warm-up run, compile included): {compile_s:.1f} s")
    for row in rows:
        g = row["greedy"]
        where = "identical" if g["identical"] else (f"{g['rows_differing']} of {g['rows']} rows differ, first at "
                                                    f"new token {g['first_difference']}")
        report.out.print(f"greedy tokens (prompt {row['prompt_len']}): {where}")


if __name__ == "__main__":
    sys.exit(main())
