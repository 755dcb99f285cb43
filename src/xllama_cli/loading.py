"""load: a checkpoint -> a Transformer on the chosen device, dtype, K/V layout and RoPE, with the
runtime plug-ins applied (int8, CPU kernels, tensor parallel hooks, a compiled decode step).

Under torchrun (WORLD_SIZE > 1) each rank builds and reads only its own part of the model
(see parallel.py); in a single process nothing of that runs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from .checkpoint import Checkpoint, open_checkpoint, release_pages
from .build import build_model
from .config import ModelConfig
from .errors import SettingError
from .linear import use_cpu_kernels
from .machine import available_bytes
from .layout import target_kv_heads
from .model import Transformer
from .quantize import check_quantize, quantize_model
from . import report
from .report import human_bytes, human_count
from .parallel import (Shard, TensorParallel, agree_on_errors, apply_tensor_parallel, plan_shard,
                       setup)
from .rope import with_rope
from .tensors import checked_tensors

if TYPE_CHECKING:
    from .generation import Step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """The device `device` names (auto: CUDA when present), checked to exist on this machine, so
    that a missing one is refused before anything is read onto it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    named = re.fullmatch(r"cuda(?::(\d{1,6}))?", device)
    if named is None:
        raise SettingError("unknown {device} {value!r}; choose auto, cpu, cuda or cuda:N",
                           value=device)
    if not torch.cuda.is_available():
        raise SettingError("{device} {value} asked for, but CUDA is not available here; "
                           "use {device} cpu", value=device)
    count = torch.cuda.device_count()
    if named[1] is not None and int(named[1]) >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise SettingError("{device} {value}: this machine has {count} CUDA device{s} ({have}); "
                           "use one of them", value=device, count=count,
                           s="" if count == 1 else "s", have=have)
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, quantize: str | None = None) -> torch.dtype:
    if dtype == "auto":  # int8 weights compute in bfloat16 on every device
        return torch.bfloat16 if device.type == "cuda" or quantize else torch.float32
    if dtype not in DTYPES:
        raise SettingError("unknown {dtype} {value!r}; choose auto, {valid}",
                           value=dtype, valid=", ".join(DTYPES))
    return DTYPES[dtype]


def target_config(ckpt: Checkpoint, attn: str | None = None, groups: int | None = None,
                  rope: str | None = None, rope_factor: float | None = None) -> ModelConfig:
    """The checkpoint's config with a K/V layout (`attn`, `groups`) and a RoPE rule applied."""
    cfg = ckpt.config
    n_kv = target_kv_heads(cfg.n_heads, cfg.n_kv_heads, attn, groups)
    return with_rope(cfg.replace(n_kv_heads=n_kv), rope, rope_factor)


@dataclass
class Loaded:
    """A model ready for inference, and what its callers need beside it: the model itself knows
    nothing of how it was loaded, compiled or split."""

    model: Transformer
    step: Step | None = None  # the compiled decode step (generation.compile_decode); None: eager
    tp: TensorParallel | None = None  # this rank's group under torchrun; None: one process
    checkpoint: Checkpoint | None = None  # what the weights were read from; None: built in memory


def open_model(source: str | Path | Checkpoint) -> Checkpoint:
    """An opened checkpoint as it is; else a folder, or a Hugging Face repo id already downloaded
    to the local cache (download.resolve_model), opened."""
    if isinstance(source, Checkpoint):
        return source
    from .download import resolve_model

    return open_checkpoint(resolve_model(source))


def load(source: str | Path | Checkpoint, *, attn: str | None = None, groups: int | None = None,
         rope: str | None = None, rope_factor: float | None = None,
         device: str = "auto", dtype: str = "auto", method: str = "mean",
         quantize: str | None = None, compile: bool = False, pack: bool = True,
         decode_batch: int | None = 1) -> Loaded:
    """Load a checkpoint (a folder, HF or Meta; a downloaded repo id; or an opened Checkpoint) as a
    Transformer with its runtime plug-ins (see `for_inference`); `loaded.model(tokens)` gives
    logits.

    attn, groups: the K/V layout (layout.target_kv_heads), K/V heads pooled by `method`.
    rope, rope_factor: the RoPE rule (rope.with_rope). quantize="int8": weight-only int8
    projections and head (quantize.py), computing in bfloat16 unless `dtype` says float16.
    compile: torch.compile the decode step (`loaded.step`). pack: on the CPU, the CPU kernels
    (linear.use_cpu_kernels), weights in oneDNN's layout where that is faster for `decode_batch`
    sequences decoded together (None: no decoding, as in perplexity); False: the plain model, for
    training or taking tensors from (`state_dict`).

    Started by torchrun, it gives this rank's part of the model (`loaded.tp` set, `model.config`
    the rank's own); every rank must call it.
    """
    ckpt = open_model(source)
    cfg = target_config(ckpt, attn, groups, rope, rope_factor)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, quantize)
    check_quantize(quantize, dt)
    tp = setup(dev)
    if tp is None:
        check_fits(cfg, dt, dev)
        model = _load(ckpt, cfg, dev, dt, method)
    else:
        # a rank that fails to read its slices stops them all, with its message
        with agree_on_errors(tp):
            check_fits(cfg, dt, tp.device, tp.world)
            model = apply_tensor_parallel(_load(ckpt, cfg, tp.device, dt, method, tp), tp)
    loaded = for_inference(model, quantize, compile, pack, decode_batch,
                           tensor_parallel=tp is not None)
    return dataclasses.replace(loaded, tp=tp, checkpoint=ckpt)


def load_model(path: str | Path | Checkpoint, **options) -> Transformer:
    """The model alone, for the Python API: `load(path, **options).model`, with load's options.
    Its decode step is the eager forward, and sampling under torchrun is each rank's own: use
    `load`, whose result carries the compiled step and the tensor-parallel group."""
    if options.get("compile"):
        raise TypeError("load_model(compile=True) would drop the compiled step; "
                        "use xllama_cli.loading.load(), whose .step it is")
    return load(path, **options).model


def check_fits(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, world: int = 1) -> None:
    """Refuse, before anything is built, a model whose weights cannot fit in the memory `device`
    has free. Under tensor parallelism a GPU holds its rank's 1/world part; ranks on the CPU
    share one machine's memory."""
    n = cfg.n_params()
    if device.type != "cuda":
        world = 1
    need = n * dtype.itemsize // world
    free = available_bytes(device)
    if need > free:
        per_rank = f" per rank of {world}" if world > 1 else ""
        raise SettingError("the model's {count} parameters ({n:,}) need {need} in {dt}{per_rank}, "
                           "but only {free} is free on {where}; use a smaller {dtype} or a machine "
                           "with more memory", count=human_count(n), n=n, need=human_bytes(need),
                           dt=str(dtype).removeprefix("torch."), where=device,
                           free=human_bytes(free), per_rank=per_rank)


def for_inference(model: Transformer, quantize: str | None = None, compile: bool = False,
                  pack: bool = True, decode_batch: int | None = 1, *,
                  tensor_parallel: bool = False) -> Loaded:
    """Put a built model on its fastest inference path, plug-in by plug-in: int8 weights if asked
    (quantize_model), the CPU kernels unless `pack` is False (use_cpu_kernels: packed for oneDNN
    where faster, except under `compile`, whose one-row products inductor fuses into kernels
    faster than oneDNN's), then the compiled decode step if asked (under tensor parallelism
    without CUDA graphs: see generation.compile_options)."""
    if quantize:
        quantize_model(model, quantize)
    if pack:
        use_cpu_kernels(model, decode_batch, pack=not compile, release=release_pages)
    step = None
    if compile:
        from .generation import compile_decode

        if tensor_parallel and model.lm_head.weight.device.type == "cuda":
            report.info("compiled decode step under tensor parallelism: no CUDA graphs (an "
                        "all-reduce is not captured in one)")
        step = compile_decode(model, tensor_parallel=tensor_parallel)
    return Loaded(model, step)


def _load(ckpt: Checkpoint, cfg: ModelConfig, dev: torch.device, dt: torch.dtype, method: str,
          tp: TensorParallel | None = None) -> Transformer:
    shard: Shard | None = None
    generator = None
    if tp is not None:
        shard = plan_shard(cfg, ckpt.config.n_kv_heads, tp.rank, tp.world)
        cfg = shard.config
        if method == "random":  # every rank must draw the same new K/V heads
            generator = torch.Generator().manual_seed(0)
    tensors = checked_tensors(ckpt, cfg, method=method, generator=generator, dtype=dt, shard=shard)
    return build_model(cfg, _placed(tensors, dev, dt, own=shard is not None), dev, dt)


def _placed(tensors: Iterator[tuple[str, torch.Tensor]], dev: torch.device, dt: torch.dtype,
            own: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor on the device in the dtype as it comes; own: a copy of its own, so that no view
    keeps the mapped checkpoint file (and its pages) alive."""
    for name, t in tensors:
        if own:
            placed = t.to(device=dev, dtype=dt, copy=True, memory_format=torch.contiguous_format)
        else:
            placed = t.to(device=dev, dtype=dt)
        if placed.device != t.device or placed.data_ptr() != t.data_ptr():
            release_pages(t)  # copied: the file's pages it read need not stay resident
        yield name, placed
