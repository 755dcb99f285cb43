"""xllama bench: time per sample against the number of KV groups (the GQA paper's figure 6).

A base model (a checkpoint, or a preset architecture with random weights) is put into each
requested K/V layout with the shared `layout.regroup_kv`, then timed through the same path
`generate` uses (`generation.generate_tokens`: one prefill pass, then decode with the KV cache).
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import io
import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import __version__, report
from .accounting import (kv_cache_bytes_per_sample, kv_read_bytes_per_step, run_need_bytes,
                         weight_bytes_per_step)
from .build import build_model, expected_shapes
from .checkpoint import Checkpoint, open_checkpoint
from .config import ARCHITECTURES, ModelConfig
from .errors import XllamaError
from .generation import GenerationStats, context_length, generate_tokens
from .layout import is_kv_param, regroup_kv, target_kv_heads
from .loading import (Loaded, cpu_activations, for_inference, kernels_mode, load_model,
                      resolve_device, resolve_dtype, stored_dtype)
from .machine import (available_bytes, bandwidth_probe_bytes, is_out_of_memory, machine_info,
                      measure_bandwidth)
from .model import Transformer
from .quantize import check_quantize
from .report import human_bytes as _bytes, human_count as _count
from .sampling import Sampling
from .writer import atomic_write, check_destination

# ---- presets: named architectures (config.ARCHITECTURES); the weights are random ----
CONFIG_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
OUT_SUFFIXES = (".json", ".csv")
PLOT_SUFFIXES = (".png", ".svg")
WARMUP_RUNS = 1


def preset_config(name: str) -> ModelConfig:
    if name not in ARCHITECTURES:
        raise XllamaError(f"unknown --preset {name!r}; choose one of: {', '.join(ARCHITECTURES)} "
                          "(see --list-presets)")
    return ModelConfig.from_name(name)


def config_from_file(path: Path, base: ModelConfig | None = None) -> ModelConfig:
    """An HF-style config.json, or a JSON object of ModelConfig fields (over `base` when given)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise XllamaError(f"cannot read --config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise XllamaError(f"--config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise XllamaError(f"--config {path} must hold a JSON object")
    if "hidden_size" in data or "num_attention_heads" in data:  # Hugging Face config.json
        if base is not None:
            raise XllamaError(f"--config {path} is a full Hugging Face config.json; drop --preset")
        return ModelConfig.from_hf(data, source=f"--config {path}")
    unknown = sorted(set(data) - CONFIG_FIELDS)
    if unknown:
        raise XllamaError(f"--config {path}: unknown field {unknown[0]!r}; use Hugging Face "
                          f"config.json keys or these: {', '.join(sorted(CONFIG_FIELDS))}")
    if base is None:
        return ModelConfig.checked(data, f"--config {path}")
    if "n_heads" in data or "dim" in data:
        data.setdefault("head_dim", 0)  # recomputed from the new dim / n_heads
    if "n_heads" in data and "n_kv_heads" not in data:
        data["n_kv_heads"] = data["n_heads"]
    return ModelConfig.checked({**dataclasses.asdict(base), **data}, f"--config {path}")


def show_presets() -> None:
    """The --list-presets table: architectures, parameter counts and sizes."""
    rows = []
    for name in ARCHITECTURES:
        cfg = ModelConfig.from_name(name)
        n = cfg.n_params()
        rows.append([name, str(cfg.n_layers), str(cfg.dim), str(cfg.n_heads), str(cfg.n_kv_heads),
                     str(cfg.hidden_dim), str(cfg.vocab_size), _count(n), _bytes(2 * n),
                     _count(cfg.replace(n_kv_heads=cfg.n_heads).n_params())])
    report.table(["preset", "layers", "dim", "heads", "KV\nheads", "FFN", "vocab", "params",
                  "bf16\nsize", "MHA base\nparams"], rows,
                 title="xllama bench presets (random weights)",
                 caption="sizes in the architecture's own KV layout (float32: twice bf16); bench "
                         "builds one MHA base and regroups its K/V for each G")
    for name, arch in ARCHITECTURES.items():
        report.write(f"  {name}: {arch.description}\n")


# ---- settings and results ----
@dataclass
class BenchOptions:
    """What the `bench` command was asked for (CLI flags)."""
    model: str | None = None
    preset: str | None = None
    config: Path | None = None
    layers: int | None = None
    groups: str | None = None
    input_len: int | None = None  # None: 512, or what the model's context leaves room for
    output_len: int | None = None  # None: 128, or a quarter of a smaller context
    batch: int = 8
    repeats: int = 3
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    compile: bool = False
    seed: int = 0
    out: Path | None = None
    plot: Path | None = None
    force: bool = False


@dataclass
class Row:
    """One group count: static sizes, then the per-run times (seconds) once measured."""
    groups: int
    kv_cache_bytes_per_sample: int
    weight_bytes_per_step: int  # weights a decode step reads (the embedding table: only B rows)
    kv_read_bytes_per_step: int  # KV cache a decode step reads, averaged over the decode steps
    status: str = "not run"  # ok | out of memory | skipped | not run
    note: str = ""
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return bool(self.prefill_s)


@dataclass
class BenchResult:
    source: str
    config: ModelConfig  # the base's architecture
    params: int
    device: torch.device
    dtype: torch.dtype
    groups: list[int]
    input_len: int
    output_len: int
    batch: int
    repeats: int
    seed: int
    # int8: each group count's model is quantized (untimed) before its runs
    quantize: str | None = None
    # decode step compiled; each group count's model is kept, so it compiles once
    compiled: bool = False
    bandwidth_bytes: int = 0
    # GB/s: before the runs, then after each round
    bandwidth_runs: list[float] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def bandwidth_gbs(self) -> float:
        """The memory bandwidth decode is compared with: the median of the copy probes."""
        return statistics.median(self.bandwidth_runs) if self.bandwidth_runs else 0.0

    @property
    def decode_steps(self) -> int:
        """Decode forward passes per run: the first new token comes from the prefill."""
        return self.output_len - 1

    def mha_row(self) -> Row | None:
        return next((r for r in self.rows if r.groups == self.config.n_heads and r.measured), None)

    def figures(self, row: Row) -> dict[str, Any]:
        """Every figure of one row (times in seconds, sizes in bytes); None where not measured."""
        kind = "MQA" if row.groups == 1 else "MHA" if row.groups == self.config.n_heads else "GQA"
        out: dict[str, Any] = {
            "groups": row.groups, "kv_heads": row.groups, "attention": kind,
            "status": row.status, "note": row.note,
            "kv_cache_bytes_per_sample": row.kv_cache_bytes_per_sample,
            "weight_bytes_per_step": row.weight_bytes_per_step,
            "kv_read_bytes_per_step": row.kv_read_bytes_per_step,
            "decode_bytes_per_step": row.weight_bytes_per_step + row.kv_read_bytes_per_step,
            "runs": len(row.prefill_s), "prefill_s_runs": row.prefill_s,
            "decode_s_runs": row.decode_s,
        }
        keys = ("prefill_s", "decode_s", "decode_s_per_token", "time_per_sample_s",
                "time_per_sample_min_s", "time_per_sample_max_s", "spread_pct", "tokens_per_s",
                "decode_tokens_per_s", "speedup_vs_mha", "decode_gbs", "bandwidth_fraction")
        out.update(dict.fromkeys(keys))
        if not row.measured:
            return out
        B, steps = self.batch, self.decode_steps
        totals = [p + d for p, d in zip(row.prefill_s, row.decode_s)]
        total, decode = statistics.median(totals), statistics.median(row.decode_s)
        per_token = decode / steps
        out.update(
            prefill_s=statistics.median(row.prefill_s), decode_s=decode,
            decode_s_per_token=per_token, time_per_sample_s=total / B,
            time_per_sample_min_s=min(totals) / B, time_per_sample_max_s=max(totals) / B,
            spread_pct=100 * (max(totals) - min(totals)) / total,
            tokens_per_s=B * self.output_len / total, decode_tokens_per_s=B * steps / decode,
            decode_gbs=out["decode_bytes_per_step"] / per_token / 1e9,
        )
        if self.bandwidth_gbs > 0:
            out["bandwidth_fraction"] = out["decode_gbs"] / self.bandwidth_gbs
        mha = self.mha_row()
        if mha is not None:
            mha_total = statistics.median([p + d for p, d in zip(mha.prefill_s, mha.decode_s)])
            out["speedup_vs_mha"] = mha_total / total
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "xllama_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"source": self.source, "params": self.params,
                      "n_heads": self.config.n_heads, "base_kv_heads": self.config.n_kv_heads,
                      "config": dataclasses.asdict(self.config)},
            "machine": self.machine,
            "torch": torch.__version__,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "settings": {"groups": self.groups, "input_len": self.input_len,
                         "output_len": self.output_len, "batch": self.batch,
                         "repeats": self.repeats, "warmup_runs": WARMUP_RUNS, "seed": self.seed,
                         "decode_steps": self.decode_steps, "regroup_method": "mean",
                         "quantize": self.quantize, "compile": self.compiled},
            "memory_bandwidth": {"gbs": self.bandwidth_gbs, "probes_gbs": self.bandwidth_runs,
                                 "copy_bytes": self.bandwidth_bytes,
                                 "method": "a torch copy of one tensor, read + write bytes / time; "
                                           "median of 10 copies per probe; one probe before the "
                                           "runs and one after each timed round; gbs is the "
                                           "median of the probes"},
            "interrupted": self.interrupted,
            "notes": self.notes,
            "rows": [self.figures(r) for r in self.rows],
        }


# ---- models ----
def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> Transformer:
    """A Transformer with random weights, made directly on `device` (no float32 CPU copy first)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name.endswith(".bias"):
            t.zero_()
        else:
            # uniform is cheaper than normal on CPU; 1/sqrt(fan_in) keeps activations near unit
            # scale
            bound = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
            t.uniform_(-bound, bound, generator=gen)
        state[name] = t
    return build_model(cfg, state, device, dtype)


def regrouped(base: Transformer, groups: int, method: str = "mean") -> Transformer:
    """A new model with `groups` KV heads (k/v weights through layout.regroup_kv), sharing every
    other tensor with `base`, so it can be quantized or compiled without changing `base`."""
    cfg = base.config
    state = {name: regroup_kv(t, cfg.n_kv_heads, groups, method) if is_kv_param(name) else t
             for name, t in base.state_dict().items()}
    p = base.model.embed_tokens.weight
    return build_model(cfg.replace(n_kv_heads=groups), state, p.device, p.dtype)


def default_groups(n_heads: int) -> list[int]:
    """Every power of two from 1 that divides n_heads, plus n_heads itself (MHA)."""
    out, g = [], 1
    while g <= n_heads:
        if n_heads % g == 0:
            out.append(g)
        g *= 2
    return sorted(set(out) | {n_heads})


def parse_groups(text: str | None, n_heads: int, base_kv: int) -> list[int]:
    """--groups "1,2,4" -> sorted group counts, each checked by the shared layout rule."""
    if text is None:
        wanted = default_groups(n_heads)
    else:
        try:
            wanted = [int(s) for s in text.replace(" ", "").split(",") if s]
        except ValueError:
            raise XllamaError("--groups expects comma-separated integers such as 1,2,4,8; got "
                              f"{text!r}") from None
        if not wanted:
            raise XllamaError("--groups is empty; give group counts such as 1,2,4,8")
    for g in wanted:
        target_kv_heads(n_heads, base_kv, "GQA", g)  # raises with the valid counts
    return sorted(set(wanted))


# ---- running ----
def check_options(o: BenchOptions) -> Checkpoint | None:
    """Everything that can be checked before any model is built; the checkpoint of --model, opened
    (once: measuring reads its config and weights from it)."""
    given = [s for s in ("--model" if o.model else None, "--preset" if o.preset else None) if s]
    if len(given) > 1:
        raise XllamaError("give either --model or --preset, not both")
    if not o.model and not o.preset and o.config is None:
        raise XllamaError("nothing to measure: pass --model PATH, --preset NAME (see "
                          "--list-presets) or --config FILE.json")
    if o.model and (o.config is not None or o.layers is not None):
        raise XllamaError("--config and --layers describe a random-weight model; they do not "
                          "apply to --model")
    if o.layers is not None and o.layers <= 0:
        raise XllamaError(f"--layers must be at least 1, got {o.layers}")
    for flag, value, least in (("--input-len", o.input_len, 1),
                               ("--output-len", o.output_len, 2),
                               ("--batch", o.batch, 1), ("--repeats", o.repeats, 1)):
        if value is not None and value < least:
            why = (" (one prefill token and at least one decode step)"
                   if flag == "--output-len" else "")
            raise XllamaError(f"{flag} must be at least {least}{why}, got {value}")
    ckpt = open_checkpoint(o.model) if o.model else None
    sources = ckpt.sources if ckpt else []
    for flag, path, suffixes in (("--out", o.out, OUT_SUFFIXES), ("--plot", o.plot, PLOT_SUFFIXES)):
        if path is None:
            continue
        if path.suffix.lower() not in suffixes:
            raise XllamaError(f"{flag} {path}: unknown file type; use {' or '.join(suffixes)}")
        check_destination(path, force=o.force, sources=sources, flag=flag, kind="file")
    if o.plot is not None:
        from .plotting import require_matplotlib
        require_matplotlib()
    return ckpt


def run_command(o: BenchOptions) -> BenchResult:
    """`xllama bench`: check, build, measure (with a progress bar), print, write --out/--plot."""
    ckpt = check_options(o)
    device = resolve_device(o.device)
    stored = stored_dtype(ckpt) if ckpt is not None and o.dtype == "auto" else None
    dtype = resolve_dtype(o.dtype, device, o.quantize, stored)
    check_quantize(o.quantize, dtype)
    result = measure(o, device, dtype, ckpt)
    show(result)
    if o.out is not None:
        write_results(result, o.out)
        report.info(f"wrote {o.out}")
    if o.plot is not None:
        from .plotting import plot_groups
        if any(r.measured for r in result.rows):
            plot_groups(per_sample(result), result.config.n_heads, plot_title(result), o.plot)
            report.info(f"wrote {o.plot}")
        else:
            report.info(f"no plot written to {o.plot}: nothing was measured")
    return result


def fit_lengths(o: BenchOptions, context: int | None) -> BenchOptions:
    """Options with the prompt and output lengths set: as asked, else 512 and 128, shrunk to fit a
    smaller context (None: no limit); asked lengths the context cannot hold are refused."""
    output_len = o.output_len if o.output_len is not None else (
        128 if context is None else max(2, min(128, context // 4)))
    input_len = o.input_len if o.input_len is not None else (
        512 if context is None else max(1, min(512, context - output_len)))
    if context is not None and input_len + output_len > context:
        raise XllamaError(f"--input-len {input_len} + --output-len {output_len} exceeds the "
                          f"model's context of {context} tokens")
    return dataclasses.replace(o, input_len=input_len, output_len=output_len)


def base_config(o: BenchOptions,
                ckpt: Checkpoint | None) -> tuple[ModelConfig, str, BenchOptions]:
    """The base model's architecture (the checkpoint's, when there is one), its name in the
    results, and the options with the lengths set. Random weights: one MHA base (regrouped for
    each group count), its context long enough."""
    if ckpt is not None:
        return ckpt.config, o.model, fit_lengths(o, context_length(ckpt.config))
    cfg = preset_config(o.preset) if o.preset else None
    if o.config is not None:
        cfg = config_from_file(o.config, cfg)
    source = f"preset {o.preset}" if o.preset else f"config {o.config}"
    if o.config is not None and o.preset:
        source += f" + {o.config}"
    changes: dict[str, Any] = {"n_kv_heads": cfg.n_heads}
    if o.layers is not None:
        changes["n_layers"] = o.layers
        source += f" (layers {o.layers})"
    o = fit_lengths(o, None)
    # random weights have no trained length: let the context cover the requested tokens
    changes["max_seq_len"] = max(cfg.max_seq_len, o.input_len + o.output_len)
    cfg = cfg.replace(**changes)
    return cfg, source, fit_lengths(o, context_length(cfg))


def measure(o: BenchOptions, device: torch.device, dtype: torch.dtype,
            ckpt: Checkpoint | None = None) -> BenchResult:
    """Build the base model (--model's checkpoint, opened as `ckpt` when given, or random weights)
    and time each group count; the result holds what was measured before a failure or Ctrl-C."""
    elsize = torch.empty((), dtype=dtype).element_size()
    ckpt = open_checkpoint(ckpt or o.model) if o.model else None
    cfg, source, o = base_config(o, ckpt)
    groups = parse_groups(o.groups, cfg.n_heads, cfg.n_kv_heads)
    params = cfg.n_params()
    result = BenchResult(source=source, config=cfg, params=params, device=device, dtype=dtype,
                         groups=groups, input_len=o.input_len, output_len=o.output_len,
                         batch=o.batch, repeats=o.repeats, seed=o.seed, quantize=o.quantize,
                         compiled=o.compile, machine=machine_info(device))
    tokens, cached = o.input_len + o.output_len, cache_element_size(result)
    for g in groups:
        result.rows.append(Row(
            groups=g, kv_cache_bytes_per_sample=kv_cache_bytes_per_sample(cfg, g, tokens, cached),
            weight_bytes_per_step=weight_bytes_per_step(cfg, g, o.batch, elsize,
                                                        o.quantize == "int8"),
            kv_read_bytes_per_step=kv_read_bytes_per_step(cfg, g, o.input_len, o.output_len,
                                                          o.batch, cached)))
    report.info(f"bench: {source} | {_count(params)} params | {device} "
                f"{str(dtype).removeprefix('torch.')} | batch {o.batch}, input {o.input_len}, "
                f"output {o.output_len}, {o.repeats} repeats + {WARMUP_RUNS} warm-up | groups "
                f"{', '.join(map(str, groups))}")
    try:
        nbytes = bandwidth_probe_bytes(device)
        result.bandwidth_bytes = nbytes
        result.bandwidth_runs.append(measure_bandwidth(device, nbytes))
        report.info(f"memory bandwidth (copy of {_bytes(nbytes)}): {result.bandwidth_gbs:.1f} GB/s "
                    "(measured again after each round)")
        need = params * elsize
        free = available_bytes(device)
        if need > free:
            return _stop(result, "skipped", "the base model does not fit",
                         f"the base model needs {_bytes(need)} but {_bytes(free)} is free on "
                         f"{device}")
        try:
            base = (load_model(ckpt, device=str(device), dtype=str(dtype).removeprefix("torch."),
                               pack=False)
                    if ckpt is not None else random_model(cfg, device, dtype, o.seed))
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            return _stop(result, "out of memory", "building the base model",
                         f"out of memory while building the base model ({_bytes(need)})")
        _time_groups(base, result)
    except KeyboardInterrupt:
        result.interrupted = True
        result.notes.append("interrupted (Ctrl-C): the figures are from the runs completed "
                            "before it")
    return result


def _time_groups(base: Transformer, result: BenchResult) -> None:
    """The main loop, in rounds: a warm-up round, then `repeats` timed rounds, each running every
    group count once (regrouped from the base each time). Interleaving the group counts spreads
    any drift in the machine's load (other jobs, clocks, heat) over all of them alike, instead of
    charging it to whichever group count happened to run while the machine was busy."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    gen = torch.Generator().manual_seed(result.seed)
    prompts = torch.randint(0, result.config.vocab_size, (result.batch, result.input_len),
                            generator=gen).tolist()
    device, elsize = result.device, base.lm_head.weight.element_size()
    runs_per_row = WARMUP_RUNS + result.repeats
    done = {row.groups: 0 for row in result.rows}
    kept: dict[int, Loaded] = {}  # compiled models, one per group count
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("runs"), TimeElapsedColumn())
    with Progress(*columns, console=report.err, transient=False) as progress:
        task = progress.add_task("bench", total=len(result.rows) * runs_per_row)
        try:
            for i in range(runs_per_row):
                label = ("warm-up" if i < WARMUP_RUNS
                         else f"run {i - WARMUP_RUNS + 1}/{result.repeats}")
                for row in result.rows:
                    if row.status in ("skipped", "out of memory"):
                        continue
                    progress.update(task, description=f"{label} G={row.groups:<3}")
                    if i == 0 and not _fits(base, result, row, elsize):
                        progress.advance(task, runs_per_row)
                        continue
                    _run_row(base, result, row, prompts, kept, timed=i >= WARMUP_RUNS)
                    done[row.groups] += 1
                    # out of memory: the runs the row will no longer make count as done
                    left = runs_per_row - done[row.groups] + 1
                    progress.advance(task, 1 if row.status != "out of memory" else left)
                # the bandwidth too, once a round, so it sees the same drift
                if i >= WARMUP_RUNS:
                    result.bandwidth_runs.append(measure_bandwidth(device, result.bandwidth_bytes))
        finally:
            for row in result.rows:
                if row.status == "not run" and row.measured:
                    row.status = "ok"
                    if len(row.prefill_s) < result.repeats:
                        row.note = (f"interrupted after {len(row.prefill_s)} of "
                                    f"{result.repeats} runs")


def cache_element_size(result: BenchResult) -> int:
    """Bytes of one KV cache element (and activation) on the path the runs take: float32 beside
    half-precision weights on the CPU kernels' path (loading.cpu_activations), else the dtype's."""
    plain = result.compiled or kernels_mode() == "plain"
    dtype = (None if plain else cpu_activations(result.device, result.dtype)) or result.dtype
    return torch.empty((), dtype=dtype).element_size()


def _fits(base: Transformer, result: BenchResult, row: Row, elsize: int) -> bool:
    """False (and the row marked skipped) when the group count clearly will not fit in memory."""
    need = run_need_bytes(result.config, row.groups, base.config.n_kv_heads, result.input_len,
                          result.output_len, result.batch, elsize, result.device,
                          cache_element_size(result))
    free = available_bytes(result.device)
    if need > free:
        row.status, row.note = "skipped", f"needs ~{_bytes(need)} more, {_bytes(free)} free"
    return need <= free


def _run_row(base: Transformer, result: BenchResult, row: Row, prompts: list[list[int]],
             kept: dict[int, Loaded], timed: bool) -> None:
    """One run of one group count; an allocation failure marks the row `out of memory`."""
    model = None
    try:
        model = kept.get(row.groups) or _prepare(base, row.groups, result)
        if result.compiled:  # a new model would compile again
            kept[row.groups] = model
        stats = _one_run(model, prompts, result.output_len)
        if timed:
            row.prefill_s.append(stats.prefill_s)
            row.decode_s.append(stats.decode_s)
    except Exception as e:  # noqa: BLE001 - only allocation failures are turned into a row
        if not is_out_of_memory(e):
            raise
        row.prefill_s.clear()
        row.decode_s.clear()
        row.status, row.note = "out of memory", str(e).splitlines()[0][:200]
        kept.pop(row.groups, None)
    finally:
        del model
        gc.collect()
        if result.device.type == "cuda":
            torch.cuda.empty_cache()


def _prepare(base: Transformer, groups: int, result: BenchResult) -> Loaded:
    """The model a group count runs: regrouped from the base, then quantized, compiled or packed
    as `xllama generate` would run it."""
    return for_inference(regrouped(base, groups), result.quantize, result.compiled,
                         decode_batch=result.batch)


def _one_run(ready: Loaded, prompts: list[list[int]], output_len: int) -> GenerationStats:
    """One generate_tokens call: greedy, and no EOS, so every sequence makes all output_len
    tokens."""
    result = generate_tokens(ready.model, prompts, output_len, Sampling(temperature=0.0),
                             eos_ids=[], step=ready.step)
    if result.stats.new_tokens != len(prompts) * output_len:
        raise RuntimeError(f"bench: expected {len(prompts) * output_len} new tokens, got "
                           f"{result.stats.new_tokens}")
    return result.stats


def _stop(result: BenchResult, status: str, why: str, note: str) -> BenchResult:
    """The result with no group count run: each row marked `status` (`why`), and `note` said."""
    for r in result.rows:
        r.status, r.note = status, why
    result.notes.append(note)
    return result


# ---- output ----
def show(result: BenchResult) -> None:
    """The table (stdout) and a terminal bar chart of time per sample."""
    dt = (str(result.dtype).removeprefix("torch.")
          + (f" {result.quantize}" if result.quantize else "")
          + (" compiled" if result.compiled else ""))
    rows = []
    for row in result.rows:
        f = result.figures(row)
        label = f"{row.groups} ({f['attention']})" if f["attention"] != "GQA" else str(row.groups)
        head = [label, _bytes(row.kv_cache_bytes_per_sample)]
        if not row.measured:
            rows.append([*head, row.status + (f": {row.note}" if row.note else ""), *[""] * 7])
            continue
        speedup, fraction = f["speedup_vs_mha"], f["bandwidth_fraction"]
        rows.append([*head, f"{f['prefill_s']:.3g}", f"{f['decode_s_per_token'] * 1e3:.3g}",
                     f"{f['time_per_sample_s']:.3g}", f"{f['spread_pct'] / 2:.1f}%",
                     f"{f['decode_tokens_per_s']:.1f}",
                     "—" if speedup is None else f"{speedup:.2f}x", f"{f['decode_gbs']:.1f}",
                     "—" if fraction is None else f"{100 * fraction:.0f}%"])
    report.table(["KV\nheads", "KV cache\n/sample", "prefill\ns", "decode\nms/tok", "s/\nsample",
                  "±", "decode\ntok/s", "vs\nMHA", "GB/s", "of\nbw"], rows,
                 title=f"xllama bench: {result.source}, {_count(result.params)} params, "
                       f"{result.device} {dt}, batch {result.batch}, input {result.input_len}, "
                       f"output {result.output_len}, median of {result.repeats}",
                 caption=f"memory bandwidth (tensor copy, {_bytes(result.bandwidth_bytes)}, "
                         f"median of {len(result.bandwidth_runs)} probes): "
                         f"{result.bandwidth_gbs:.1f} GB/s. ±: half the range of the time per "
                         "sample over the runs, as a share of the median. GB/s: (weights + KV "
                         "cache) a decode step reads / its time")
    for row in result.rows:
        if row.note and row.measured:
            report.info(f"G={row.groups}: {row.note}")
    for note in result.notes:
        report.info(note)
    _bars(result)


def per_sample(result: BenchResult) -> list[tuple[int, float, float]]:
    """(group count, prefill s, decode s) per sample, for each measured group count."""
    figures = [(r.groups, result.figures(r)) for r in result.rows if r.measured]
    return [(g, f["prefill_s"] / result.batch, f["decode_s"] / result.batch) for g, f in figures]


def plot_title(result: BenchResult) -> str:
    dt = str(result.dtype).removeprefix("torch.")
    return (f"{result.source}: batch {result.batch}, input {result.input_len}, output "
            f"{result.output_len}\n{result.device} {dt}, median of {result.repeats}")


def _bars(result: BenchResult, width: int = 48) -> None:
    """Time per sample as horizontal bars: prefill then decode, as the plot stacks them."""
    measured = [(r, result.figures(r)) for r in result.rows if r.measured]
    if not measured:
        return
    top = max(f["time_per_sample_s"] for _, f in measured)
    lines = ["time per sample ([cyan]█[/] prefill, [magenta]█[/] decode):"]
    for row, f in measured:
        pre = f["prefill_s"] / result.batch
        dec = f["decode_s"] / result.batch
        n_pre = round(width * pre / top)
        n_dec = max(0, round(width * (pre + dec) / top) - n_pre)
        lines.append(f"  G={row.groups:<4}[cyan]{'█' * n_pre}[/][magenta]{'█' * n_dec}[/]"
                     f"{' ' * (width - n_pre - n_dec)} {f['time_per_sample_s']:.3f} s")
    report.out.print("\n".join(lines))


def write_results(result: BenchResult, path: Path) -> None:
    """--out: JSON (everything, nested) or CSV (one line per group count, settings repeated)."""
    data = result.to_dict()
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        context = {"source": result.source, "params": result.params, "device": data["device"],
                   "dtype": data["dtype"], "torch": data["torch"], "cpu": result.machine.get("cpu"),
                   "gpu": result.machine.get("gpu"),
                   "torch_threads": result.machine.get("torch_threads"),
                   **{k: v for k, v in data["settings"].items() if k != "groups"},
                   "bandwidth_gbs": result.bandwidth_gbs, "interrupted": result.interrupted}
        buf = io.StringIO()
        rows = [{**r, **context} for r in data["rows"]]
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["groups"],
                                lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v
                             for k, v in r.items()})
        text = buf.getvalue()
    atomic_write(path, lambda tmp: tmp.write_text(text))
