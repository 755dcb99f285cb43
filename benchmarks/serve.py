"""Throughput and time to first token of `xllama serve` under N concurrent clients.

    PYTHONPATH=src python benchmarks/serve.py [--clients 1,4,8,16] [--seconds 60]
        [--max-tokens 64] [--prompt-len 64] [--max-batch 8] [--model DIR] [--json PATH]
        [-- EXTRA SERVE FLAGS]

Builds the 220M-parameter model of benchmarks/decode.py with random weights (or takes --model, an
HF folder with a tokenizer), with the Llama 2 tokenizer from ../shared/fixtures (its 32000 pieces
are the model's vocabulary; without it, the demo model's tokenizer, whose pieces cover only the
first ids). Starts `python -m xllama_cli serve` on 127.0.0.1, then for each N: N clients, each
sending streamed greedy /v1/completions requests one after another for --seconds (a request
under way at the end is waited for). A request's prompt is one of 16 slices of
benchmarks/data/heldout_stories.txt, --prompt-len tokens each, sent as token ids.

Per N: aggregate tokens/s (every completion token, over the wall time from the first request to
the last answer), requests, time to first token p50/p99 (from sending to the first text chunk:
queueing and prefill included), and errors, which must be 0: an HTTP error, a stream without
its [DONE], usage that disagrees with the tokens received, an answer cut short, or a text that
differs from another answer to the same prompt (greedy: every answer to a prompt is the same,
whatever else was decoded beside it). Prints a table and writes JSON (default
benchmarks/results/serve.json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from decode import ARCHITECTURE, random_checkpoint  # noqa: E402 - the decode benchmark's model
from xllama_cli import __version__, report  # noqa: E402
from xllama_cli.config import ModelConfig  # noqa: E402
from xllama_cli.machine import machine_info  # noqa: E402
from xllama_cli.options import DEMO_MODEL  # noqa: E402
from xllama_cli.tokenizer import load_tokenizer  # noqa: E402
from xllama_cli.writer import atomic_write  # noqa: E402

LLAMA2_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "tokenizers" / "llama2-tokenizer.model"
TEXT = ROOT / "benchmarks" / "data" / "heldout_stories.txt"
PROMPTS = 16
START_S = 600.0  # the server's start (writing and loading the model) and one answer are bounded


@dataclass
class Result:
    """One request as a client saw it."""

    prompt: int
    sent: float
    first: float | None = None
    done: float | None = None
    text: str = ""
    tokens: int = 0  # completion tokens in the usage chunk
    chunks: int = 0
    error: str | None = None


@dataclass
class Level:
    clients: int
    results: list[Result] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0


def stream_completion(host: str, port: int, prompt: list[int], max_tokens: int,
                      result: Result) -> None:
    """One streamed completion over a fresh connection; what it saw goes into `result`."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, port, timeout=START_S)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            result.error = f"HTTP {r.status}: {r.read()[:200]!r}"
            return
        finished = False
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                finished = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.error = chunk["error"]["message"]
                return
            for choice in chunk["choices"]:
                if choice["text"] and result.first is None:
                    result.first = time.perf_counter()
                result.text += choice["text"]
                result.chunks += 1
                if choice["finish_reason"] not in (None, "length", "stop"):
                    result.error = f"finish_reason {choice['finish_reason']}"
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
        result.done = time.perf_counter()
        if not finished:
            result.error = "the stream ended without [DONE]"
        elif result.tokens != max_tokens:
            result.error = f"{result.tokens} tokens of {max_tokens}"
    except (OSError, ValueError, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def run_level(url: str, prompts: list[list[int]], clients: int, seconds: float,
              max_tokens: int) -> Level:
    """`clients` threads, each sending one request after another until `seconds` have passed."""
    where = urlsplit(url)
    level = Level(clients)
    lock = threading.Lock()
    counter = iter(range(10**9))

    def client() -> None:
        while time.perf_counter() < level.start + seconds:
            with lock:
                i = next(counter)
            result = Result(i % len(prompts), time.perf_counter())
            stream_completion(where.hostname, where.port, prompts[result.prompt], max_tokens,
                              result)
            with lock:
                level.results.append(result)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    level.start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    level.end = time.perf_counter()
    return level


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(level: Level, expected: dict[int, str]) -> dict:
    """The level's figures; a text that differs from the first answer to its prompt is an
    error."""
    for r in level.results:
        if r.error is None:
            first = expected.setdefault(r.prompt, r.text)
            if r.text != first:
                r.error = "its text differs from another answer to the same prompt"
    ok = [r for r in level.results if r.error is None]
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    wall = max((r.done for r in ok), default=level.end) - level.start
    tokens = sum(r.tokens for r in ok)
    return {"clients": level.clients, "requests": len(level.results), "tokens": tokens,
            "wall_s": wall, "tok_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "ttft_p99_s": percentile(ttft, 99) if ttft else None,
            "errors": len(level.results) - len(ok),
            "error_examples": sorted({r.error for r in level.results if r.error})[:3]}


def make_prompts(tokenizer, length: int) -> list[list[int]]:
    """PROMPTS slices of the stories text, `length` tokens each, BOS first."""
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"), bos=False)
    if len(ids) < length:
        ids = ids * (length // max(len(ids), 1) + 1)
    step = max(1, (len(ids) - length) // PROMPTS)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return [bos + ids[i * step:i * step + length - len(bos)] for i in range(PROMPTS)]


def prepare_model(a: argparse.Namespace, tmp: Path) -> Path:
    if a.model is not None:
        return a.model
    cfg = ModelConfig.from_name(ARCHITECTURE)
    report.info(f"writing a random {cfg.n_params() / 1e6:.1f}M-parameter model to {tmp}")
    random_checkpoint(cfg, tmp)
    tokenizer = LLAMA2_TOKENIZER if LLAMA2_TOKENIZER.is_file() else DEMO_MODEL / "tokenizer.model"
    if tokenizer != LLAMA2_TOKENIZER:
        report.info(f"{LLAMA2_TOKENIZER} not found: the demo model's tokenizer stands in (ids past "
                    "its pieces make no text)")
    shutil.copy(tokenizer, tmp / "tokenizer.model")
    return tmp


def start_server(model: Path, a: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ,
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "xllama_cli", "serve", "--model", str(model), "--port", "0",
           "--max-batch", str(a.max_batch), "--max-queue", str(max(a.clients)), *a.serve_flags]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=f, env=env)
    end = time.monotonic() + START_S
    while time.monotonic() < end:
        m = re.search(r"serving .* at (http://\S+)", log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"serve did not start within {START_S:g} s")


def show(rows: list[dict], a: argparse.Namespace) -> None:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title=f"xllama serve, {a.seconds:g} s per level, "
                  f"{a.prompt_len}-token prompts, {a.max_tokens} new tokens each, greedy, "
                  f"--max-batch {a.max_batch}")
    for col in ("clients", "requests", "tok/s", "x one client", "TTFT p50", "TTFT p99", "errors"):
        table.add_column(col, justify="right", no_wrap=True)
    one = next((r["tok_s"] for r in rows if r["clients"] == 1), None)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.0f} ms"

    for r in rows:
        table.add_row(str(r["clients"]), str(r["requests"]), f"{r['tok_s']:.1f}",
                      f"{r['tok_s'] / one:.2f}x" if one else "-", ms(r["ttft_p50_s"]),
                      ms(r["ttft_p99_s"]), str(r["errors"]))
    report.out.print(table)
    for r in rows:
        for e in r["error_examples"]:
            report.out.print(f"{r['clients']} clients, error: {e}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,4,8,16",
                    type=lambda s: [int(v) for v in s.split(",")], help="levels of concurrency")
    ap.add_argument("--seconds", type=float, default=60.0, help="time per level")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    ap.add_argument("--model", type=Path, help=f"an HF folder instead of the random {ARCHITECTURE}")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    ap.add_argument("serve_flags", nargs="*", help="after --: more flags for xllama serve")
    a = ap.parse_args(argv)
    if min(a.clients) < 1 or a.seconds <= 0 or a.max_tokens < 1 or a.prompt_len < 2:
        ap.error("--clients, --seconds, --max-tokens must be positive, --prompt-len at least 2")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    load = os.getloadavg()[0]
    if load >= 1.0:
        report.info(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs before the run; "
                    "the figures are unreliable")
    with tempfile.TemporaryDirectory(prefix="xllama-serve-bench-") as tmp:
        model = prepare_model(a, Path(tmp))
        prompts = make_prompts(load_tokenizer(model), a.prompt_len)
        log = Path(tmp) / "serve.log"
        proc, url = start_server(model, a, log)
        try:
            report.info(f"server at {url}; one warm-up request")
            warm = Result(0, time.perf_counter())
            stream_completion(urlsplit(url).hostname, urlsplit(url).port, prompts[0],
                              a.max_tokens, warm)
            if warm.error:
                raise SystemExit(f"the warm-up request failed: {warm.error}")
            expected = {0: warm.text}
            rows = []
            for n in a.clients:
                report.info(f"{n} client(s) for {a.seconds:g} s")
                rows.append(summarize(run_level(url, prompts, n, a.seconds, a.max_tokens),
                                      expected))
        finally:
            proc.terminate()
            proc.wait(60)
        lines = log.read_text(errors="replace").splitlines()
    show(rows, a)
    doc = {"xllama_version": __version__,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {**machine_info(torch.device("cpu")), "load_average_before": load},
           "model": {"source": str(a.model or f"random {ARCHITECTURE}")},
           "settings": {"seconds": a.seconds, "max_tokens": a.max_tokens,
                        "prompt_len": a.prompt_len, "max_batch": a.max_batch,
                        "serve_flags": a.serve_flags, "prompts": PROMPTS},
           "server_log_lines": len(lines), "levels": rows}
    atomic_write(a.json, lambda p: p.write_text(json.dumps(doc, indent=2) + "\n"))
    report.info(f"wrote {a.json}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
