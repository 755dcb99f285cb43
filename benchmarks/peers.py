"""xllama against transformers and llama.cpp on the same weights, in one run: fp32, bf16, int8, int4.

    PYTHONPATH=src python benchmarks/peers.py [--precision fp32,bf16,int8,int4] [--batch 1,8]
        [--prompt-len 128] [--new-tokens 128] [--repeats 3] [--threads N] [--model DIR]
        [--json PATH]

Builds the random 220M-parameter `bench-220m` Llama of benchmarks/decode.py (or takes --model, an
HF folder), saves it once as an HF folder with the Llama 2 tokenizer of ../shared/fixtures (which
llama.cpp's converter needs), and converts it to GGUF with ../shared/peers/llamacpp.sh: F32,
BF16, Q8_0, Q4_0. Each precision then runs, round by round after one warm-up each: xllama
(`loading.load`, the default path: --dtype, --quantize, no --compile), transformers (sdpa; in
bfloat16 for int8 and int4, which it has no CPU kernels for), llama.cpp (`llama-bench -r 1` per
round, as many threads as torch uses) and a copy probe of the memory bandwidth. Batch 8 runs
xllama against transformers only (llama-bench generates one sequence).

Prints medians over the rounds: prefill and decode tok/s, the bytes a decode step reads per second
and against the probe, the bound that bandwidth sets on decode (bytes per token / probe), and the
ratios of xllama to each peer (the median of the per-round ratios: neighbours share the drift).
llama.cpp is skipped, with a line saying why, when it is not built. JSON: --json, default
benchmarks/results/peers-<date>.json.

llama-bench's tg test generates from an empty context (b4748 has no prompt-depth option), so its
decode attends over 0-128 positions where xllama's and transformers' attend over 128-256. The
llama.cpp row is therefore decode after the prompt, as ours: llama-bench's pg test (the prompt,
then the new tokens) less its pp test (the prompt alone), in the same llama-bench call. Its tg
test is shown below it ("tg from an empty context") with its own ratio. In this model (16 K/V
heads; xllama's cache in float32 beside any weights) the cache attended over after the prompt is,
by count, 2% (fp32) to 13% (int4) of the bytes of xllama's decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as decode_bench  # noqa: E402 - benchmarks/decode.py, beside this file

from xllama_cli import __version__, loading, report  # noqa: E402
from xllama_cli.accounting import kv_read_bytes_per_step  # noqa: E402
from xllama_cli.checkpoint import open_checkpoint  # noqa: E402
from xllama_cli.config import ModelConfig  # noqa: E402
from xllama_cli.errors import XllamaError  # noqa: E402
from xllama_cli.model import Transformer  # noqa: E402
from xllama_cli.machine import OtherWork, bandwidth_probe_bytes, machine_info, measure_bandwidth  # noqa: E402
from xllama_cli.quantize import GROUP  # noqa: E402
from xllama_cli.writer import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMACPP = ROOT.parent / "shared" / "peers" / "llamacpp.sh"
TOKENIZER = ROOT.parent / "shared" / "fixtures" / "tokenizers" / "llama2-tokenizer.model"
RESULTS = ROOT / "benchmarks" / "results"
CPU = torch.device("cpu")
# llama-bench's tg test: decode from an empty context, so over fewer positions than ours (its
# "llama.cpp" figure is decode after the prompt, as ours: see llamacpp_rates)
EMPTY_CONTEXT = "llama.cpp tg"
QUIET = 0.05  # a run during which other processes took more of the CPUs than this is flagged


class Precision:
    """One row group: xllama's --dtype/--quantize, transformers' dtype, llama.cpp's GGUF type,
    and the bytes a weight of a projection or the head takes."""

    def __init__(self, name: str, dtype: str, quantize: str | None, gguf: str,
                 weight_bytes: float) -> None:
        self.name, self.dtype, self.quantize, self.gguf = name, dtype, quantize, gguf
        self.weight_bytes = weight_bytes

    @property
    def hf_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


PRECISIONS = {
    "fp32": Precision("fp32", "float32", None, "f32", 4),
    "bf16": Precision("bf16", "bfloat16", None, "bf16", 2),
    # int8: a byte a weight (a bfloat16 scale per row, negligible); int4: half a byte and a
    # bfloat16 scale and zero per group (the head at int8)
    "int8": Precision("int8", "bfloat16", "int8", "q8_0", 1),
    "int4": Precision("int4", "bfloat16", "int4", "q4_0", 0.5 + 4 / GROUP),
}


def step_bytes(cfg: ModelConfig, p: Precision, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Bytes one decode step reads: every projection and the head at the precision's bytes per
    weight, B rows of the embedding, the norms, and the KV cache attended over (bfloat16 for the
    quantized ones)."""
    elsize = torch.empty((), dtype=p.hf_dtype).element_size()
    with torch.device("meta"):
        model = Transformer(cfg)
    linear = 0.0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):  # int4 keeps the head and odd widths at int8
            int8 = p.quantize == "int4" and (name == "lm_head" or m.in_features % GROUP)
            linear += m.weight.numel() * (1 if int8 else p.weight_bytes)
    norms = sum(t.numel() for n, t in model.named_parameters() if n.endswith("norm.weight"))
    rest = (batch * cfg.dim + norms) * elsize
    return int(linear + rest + kv_read_bytes_per_step(
        cfg, cfg.n_kv_heads, prompt_len, new_tokens, batch, elsize))


# ---- llama.cpp ----
def llamacpp_bench() -> tuple[Path | None, str]:
    """llama-bench's path, or None and why it cannot run."""
    if not LLAMACPP.is_file():
        return None, f"{LLAMACPP} not found"
    run = subprocess.run(["bash", str(LLAMACPP), "bin", "llama-bench"], capture_output=True, text=True)
    if run.returncode != 0:
        return None, run.stderr.strip().removeprefix("llamacpp.sh: ") or "llama-bench not found"
    return Path(run.stdout.strip()), ""


def convert(folder: Path, out: Path, gguf_type: str) -> Path:
    """The HF folder as GGUF of `gguf_type` (llamacpp.sh gguf), with this Python's packages."""
    run = subprocess.run(["bash", str(LLAMACPP), "gguf", str(folder), str(out), gguf_type],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    if run.returncode != 0:
        raise XllamaError(f"llama.cpp's conversion to {gguf_type} failed: {run.stderr.strip()}")
    return out


def time_llamacpp(bench: Path, gguf: Path, prompt_len: int, new_tokens: int, threads: int
                  ) -> tuple[float, float, float]:
    """One llama-bench round (after its own warm-up): prefill tok/s, decode tok/s after the prompt
    (attending over the positions xllama's decode does), and decode tok/s from an empty context
    (llama-bench's own tg test)."""
    cmd = [str(bench), "-m", str(gguf), "-p", str(prompt_len), "-n", str(new_tokens),
           "-pg", f"{prompt_len},{new_tokens}", "-t", str(threads), "-r", "1", "-o", "json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise XllamaError(f"llama-bench failed on {gguf.name}: {run.stderr.strip()[-300:]}")
    return llamacpp_rates(json.loads(run.stdout), new_tokens)


def llamacpp_rates(tests: list[dict], new_tokens: int) -> tuple[float, float, float]:
    """llama-bench's pp, tg and pg tests as (prefill, decode after the prompt, decode from an
    empty context) tok/s. b4748 has no option to decode after a prompt alone; its pg test runs
    the prompt and then the new tokens, so their decode took pg's time less pp's."""
    pp = next(t for t in tests if t["n_prompt"] and not t["n_gen"])
    tg = next(t for t in tests if t["n_gen"] and not t["n_prompt"])
    pg = next(t for t in tests if t["n_gen"] and t["n_prompt"])
    after_prompt = new_tokens / ((pg["avg_ns"] - pp["avg_ns"]) / 1e9)
    return pp["avg_ts"], after_prompt, tg["avg_ts"]


# ---- the runs ----
def parse_list(text: str, valid: tuple[str, ...] | None = None) -> list[str]:
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if valid is not None and t not in valid]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"expected a list of {', '.join(valid or ('values',))}, got {text!r}")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", type=lambda t: parse_list(t, tuple(PRECISIONS)), default=list(PRECISIONS))
    ap.add_argument("--batch", type=decode_bench.parse_lengths, default=[1, 8], help="batch 1 runs all three; others skip llama.cpp")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds, after one warm-up")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads, and llama-bench -t (default: torch's)")
    ap.add_argument("--model", type=Path, help=f"an HF folder instead of the random {decode_bench.ARCHITECTURE} model")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    ap.add_argument("--json", type=Path, help="default: benchmarks/results/peers-<UTC date and time>.json")
    decode_bench.add_shape_flags(ap)
    a = ap.parse_args(argv)
    decode_bench.check_counts(ap, a, ("prompt_len", "new_tokens", "repeats", "threads"))
    return a


def main(argv: list[str] | None = None) -> int:
    return decode_bench.exit_status(run, parse_args(argv))


def prepare_model(a: argparse.Namespace, folder: Path) -> Path:
    """The HF folder to measure: --model, or the random model written into `folder`; with the
    Llama 2 tokenizer beside it where it has none and the vocabulary fits (for llama.cpp)."""
    if a.model is not None:
        return a.model
    decode_bench.write_random_model(a, folder)
    if TOKENIZER.is_file() and a.vocab == 32000:
        shutil.copy(TOKENIZER, folder / "tokenizer.model")
        (folder / "tokenizer.model").chmod(0o644)
    return folder


def ggufs(a: argparse.Namespace, folder: Path, out: Path) -> tuple[Path | None, dict[str, Path], str]:
    """llama-bench and a GGUF per precision, or None and why llama.cpp is skipped."""
    if a.no_llamacpp:
        return None, {}, "--no-llamacpp"
    bench, why = llamacpp_bench()
    if bench is None:
        return None, {}, why
    if not (folder / "tokenizer.model").is_file():
        return None, {}, f"{folder} has no tokenizer.model, which llama.cpp's converter needs ({TOKENIZER} absent?)"
    files = {}
    for name in a.precision:
        p = PRECISIONS[name]
        report.info(f"converting to GGUF {p.gguf}")
        files[name] = convert(folder, out / f"model-{p.gguf}.gguf", p.gguf)
    return bench, files, ""


def run(a: argparse.Namespace) -> int:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    if load >= 1.0:
        report.info(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs before the run; other processes "
                    "compete for cores and memory bandwidth, so the figures are unreliable")
    with tempfile.TemporaryDirectory(prefix="xllama-peers-") as tmp:
        folder = prepare_model(a, Path(tmp) / "hf")
        cfg = open_checkpoint(folder).config
        decode_bench.check_context(cfg, a.prompt_len, a.new_tokens)
        bench, files, skipped = ggufs(a, folder, Path(tmp))
        if bench is None:
            report.info(f"llama.cpp: skipped ({skipped})")
        probe = bandwidth_probe_bytes(CPU)
        probes = [measure_bandwidth(CPU, probe)]
        hf_models: dict[torch.dtype, torch.nn.Module] = {}
        rows = []
        for name in a.precision:
            p = PRECISIONS[name]
            if p.hf_dtype not in hf_models:
                hf_models[p.hf_dtype] = LlamaForCausalLM.from_pretrained(
                    folder, dtype=p.hf_dtype, attn_implementation="sdpa").eval()
            for batch in a.batch:
                t0 = time.perf_counter()
                ours = loading.load(folder, device="cpu", dtype=p.dtype, quantize=p.quantize, decode_batch=batch)
                load_s = time.perf_counter() - t0
                peer = files.get(name) if batch == 1 else None
                runs, toks = measure(a, p, batch, cfg, ours, hf_models[p.hf_dtype], bench, peer, threads, probes, probe)
                rows.append({"precision": name, "batch": batch, "xllama_load_s": load_s, "runs": runs,
                             "greedy": decode_bench.compare_tokens(toks["xllama"], toks["transformers"])})
                del ours
    bandwidth = statistics.median(probes)
    results = [summarize(row, cfg, a, bandwidth) for row in rows]
    show(results, a, cfg, bandwidth, threads, skipped)
    doc = {"xllama_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {**machine_info(CPU), "load_average_before": load},
           "transformers": __import__("transformers").__version__,
           "llama_cpp": {"release": "b4748", "skipped": skipped or None, "llama_bench": str(bench) if bench else None},
           "model": {"source": str(a.model or "random"), "params": cfg.n_params(), "config": cfg.to_hf()},
           "settings": {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "decode_steps": a.new_tokens - 1,
                        "repeats": a.repeats, "warmup_runs": 1, "threads": threads,
                        "xllama_kernels": os.environ.get("XLLAMA_KERNELS", "auto")},
           "memory_bandwidth": {"gbs": bandwidth, "probes_gbs": probes, "copy_bytes": probe},
           "runs": results}
    path = a.json or RESULTS / f"peers-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write_text(json.dumps(doc, indent=2) + "\n"))
    report.info(f"wrote {path}")
    return 0


def measure(a: argparse.Namespace, p: Precision, batch: int, cfg: ModelConfig, ours, hf, bench: Path | None,
            gguf: Path | None, threads: int, probes: list[float], probe: int) -> tuple[dict, dict]:
    """Rounds of xllama, transformers and llama.cpp (when `gguf`), then a bandwidth probe; round 0
    is the warm-up. Returns each system's per-round times (llama.cpp: tokens/s) and last tokens."""
    prompts = torch.randint(0, cfg.vocab_size, (batch, a.prompt_len),
                            generator=torch.Generator().manual_seed(decode_bench.SEED))
    runners = ["xllama", "transformers"] + (["llama.cpp"] if gguf is not None else [])
    # llama.cpp's run gives two decode figures: after the prompt, as ours, and from an empty context
    systems = runners + ([EMPTY_CONTEXT] if gguf is not None else [])
    runs: dict[str, dict[str, list[float]]] = {s: {"prefill": [], "decode": [], "others_cpu": []}
                                               for s in systems}
    toks: dict[str, list[list[int]]] = {}
    with report.progress((1 + a.repeats) * len(runners), f"{p.name}, batch {batch}", unit="runs") as advance:
        for r in range(1 + a.repeats):
            for s in runners:
                others = OtherWork()
                if s == "llama.cpp":
                    pp, tg, tg_empty = time_llamacpp(bench, gguf, a.prompt_len, a.new_tokens, threads)
                    # as times of our runs' shape
                    times = {s: (a.prompt_len / pp, (a.new_tokens - 1) / tg),
                             EMPTY_CONTEXT: (a.prompt_len / pp, (a.new_tokens - 1) / tg_empty)}
                else:
                    fn = decode_bench.time_xllama if s == "xllama" else decode_bench.time_transformers
                    pre, dec, toks[s] = fn(ours if s == "xllama" else hf, prompts, a.new_tokens)
                    times = {s: (pre, dec)}
                share = others.share()
                for system, (pre, dec) in times.items() if r > 0 else ():
                    runs[system]["prefill"].append(pre)
                    runs[system]["decode"].append(dec)
                    runs[system]["others_cpu"].append(share)
                advance(1, f"{'warm-up' if r == 0 else f'round {r}'}, {s}")
            if r > 0:
                probes.append(measure_bandwidth(CPU, probe))
    return runs, toks


def summarize(row: dict, cfg: ModelConfig, a: argparse.Namespace, bandwidth: float) -> dict:
    """Medians, spreads, GB/s and ratios of one precision and batch."""
    p, batch, steps = PRECISIONS[row["precision"]], row["batch"], a.new_tokens - 1
    nbytes = step_bytes(cfg, p, batch, a.prompt_len, a.new_tokens)
    systems = {}
    for s, times in row["runs"].items():
        prefill = [batch * a.prompt_len / t for t in times["prefill"]]
        decode = [batch * steps / t for t in times["decode"]]
        med = statistics.median(decode)
        systems[s] = {"prefill_s_runs": times["prefill"], "decode_s_runs": times["decode"],
                      "others_cpu_share_runs": times["others_cpu"],
                      "prefill_tok_s": statistics.median(prefill), "decode_tok_s": med,
                      "decode_spread_pct": 50 * (max(decode) - min(decode)) / med,
                      "decode_gbs": nbytes * med / batch / 1e9,
                      "bandwidth_fraction": nbytes * med / batch / 1e9 / bandwidth}
    x = row["runs"]["xllama"]
    ratios = {peer: {side: statistics.median(theirs / mine for mine, theirs in zip(x[side], row["runs"][peer][side]))
                     for side in ("prefill", "decode")}
              for peer in row["runs"] if peer != "xllama"}
    shares = [v for t in row["runs"].values() for v in t["others_cpu"] if v is not None]
    return {"precision": p.name, "batch": batch, "xllama": {"dtype": p.dtype, "quantize": p.quantize},
            "transformers_dtype": p.dtype, "llama_cpp_type": p.gguf.upper() if "llama.cpp" in systems else None,
            "decode_bytes_per_step": nbytes, "decode_bound_tok_s": bandwidth * 1e9 / nbytes * batch,
            "xllama_load_s": row["xllama_load_s"], "systems": systems, "ratios": ratios, "greedy": row["greedy"],
            "others_cpu_share_max": max(shares, default=None)}


def say(line: str) -> None:
    """A line on stdout, whole (no wrapping at the terminal's width)."""
    report.out.print(line, soft_wrap=True, markup=False, highlight=False)


def show(results: list[dict], a: argparse.Namespace, cfg: ModelConfig, bandwidth: float, threads: int,
         skipped: str) -> None:
    table = Table(box=box.SIMPLE_HEAD, title=f"{cfg.n_params() / 1e6:.1f}M params, prompt {a.prompt_len}, "
                  f"{a.new_tokens} new tokens, {threads} threads; medians of {a.repeats} rounds",
                  caption=f"bound: decode tok/s at the probe's {bandwidth:.1f} GB/s. ratios: xllama / peer, "
                          "median of the per-round ratios, decode (prefill)")
    for col in ("precision", "batch", "system", "prefill tok/s", "decode tok/s", "GB/s", "of probe", "bound",
                "xllama / peer"):
        table.add_column(col, justify="left" if col in ("precision", "system") else "right", no_wrap=True)
    for res in results:
        for i, (s, f) in enumerate(res["systems"].items()):
            label = {"llama.cpp": f"llama.cpp {res['llama_cpp_type']}",
                     EMPTY_CONTEXT: "  (tg from an empty context)",
                     "transformers": f"transformers {res['transformers_dtype']}"}.get(s, "xllama")
            r = res["ratios"].get(s)
            table.add_row(res["precision"] if i == 0 else "", str(res["batch"]) if i == 0 else "", label,
                          f"{f['prefill_tok_s']:.0f}", f"{f['decode_tok_s']:.1f} ±{f['decode_spread_pct']:.0f}%",
                          f"{f['decode_gbs']:.1f}", f"{100 * f['bandwidth_fraction']:.0f}%",
                          f"{res['decode_bound_tok_s']:.0f}" if i == 0 else "",
                          f"{r['decode']:.2f}x ({r['prefill']:.2f}x)" if r else "",
                          end_section=i == len(res["systems"]) - 1)
    # the table's full width when stdout is a file or a pipe (as a terminal's when it is one)
    Console(highlight=False, width=None if sys.stdout.isatty() else 140).print(table)
    say(f"probe bandwidth: {bandwidth:.1f} GB/s")
    if skipped:
        say(f"llama.cpp: skipped ({skipped})")
    busy = [(r["precision"], r["batch"], r["others_cpu_share_max"]) for r in results
            if (r["others_cpu_share_max"] or 0) > QUIET]
    if busy:
        say("warning: other processes took CPU time during the runs (largest share of the machine "
                         "per run: " + ", ".join(f"{p} batch {b} {100 * v:.0f}%" for p, b, v in busy)
                         + "); those figures are unreliable")
    for res in results:
        g = res["greedy"]
        where = "identical" if g["identical"] else (f"{g['rows_differing']} of {g['rows']} rows differ, first at "
                                                    f"new token {g['first_difference']}")
        say(f"greedy tokens, {res['precision']} batch {res['batch']}, xllama vs transformers: {where}")


if __name__ == "__main__":
    sys.exit(main())
