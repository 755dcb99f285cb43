"""load_model: a checkpoint folder -> a Transformer on the chosen device, dtype, K/V layout and RoPE.

Under torchrun (WORLD_SIZE > 1) each rank builds and reads only its own part of the model
(see parallel.py); in a single process nothing of that runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import Checkpoint, open_checkpoint, release_pages
from .build import build_model
from .config import ModelConfig
from .errors import XllamaError
from .linear import pack_model
from .machine import available_bytes
from .layout import target_kv_heads
from .model import Transformer
from .quantize import check_quantize, quantize_model
from .report import human_bytes, human_count
from .parallel import Shard, TensorParallel, agree_on_errors, make_row_parallel, plan_shard, setup
from .rope import with_rope
from .tensors import checked_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise XllamaError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise XllamaError(f"unknown --device {device!r}; choose auto, cpu or cuda")


def resolve_dtype(dtype: str, device: torch.device, quantize: str | None = None) -> torch.dtype:
    if dtype == "auto":  # int8 weights compute in bfloat16 on every device
        return torch.bfloat16 if device.type == "cuda" or quantize else torch.float32
    if dtype not in DTYPES:
        raise XllamaError(f"unknown --dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def target_config(ckpt: Checkpoint, attn: str | None = None, groups: int | None = None,
                  rope: str | None = None, rope_factor: float | None = None) -> ModelConfig:
    """The checkpoint's config with --attn/--groups and --rope/--rope-factor applied."""
    cfg = ckpt.config
    n_kv = target_kv_heads(cfg.n_heads, cfg.n_kv_heads, attn, groups)
    return with_rope(cfg.replace(n_kv_heads=n_kv), rope, rope_factor)


def load_model(path: str | Path | Checkpoint, *, attn: str | None = None, groups: int | None = None,
               rope: str | None = None, rope_factor: float | None = None,
               device: str = "auto", dtype: str = "auto", method: str = "mean",
               quantize: str | None = None, compile: bool = False, pack: bool = True,
               decode_batch: int | None = 1) -> Transformer:
    """Load a checkpoint folder (HF or Meta, or one already opened) as a Transformer; `model(tokens)`
    gives logits.

    quantize="int8": weight-only int8 projections and head (quantize.py), computing in bfloat16
    unless `dtype` says float16. compile: torch.compile the decode step (Transformer.compile_decode).
    pack: on the CPU, hold the projections in oneDNN's layout where that is faster for `decode_batch`
    sequences decoded together (None: no decoding, as in perplexity); see linear.packable. Pass
    False for a model to train or to take tensors from (`state_dict`). See `for_inference`.

    Started by torchrun, it returns this rank's part of the model (`model.tensor_parallel` set,
    `model.config` the rank's own); every rank must call it.
    """
    ckpt = open_checkpoint(path)
    cfg = target_config(ckpt, attn, groups, rope, rope_factor)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, quantize)
    check_quantize(quantize, dt)
    tp = setup(dev)
    if tp is None:
        check_fits(cfg, dt, dev)
        model = _load(ckpt, cfg, dev, dt, method)
    else:
        with agree_on_errors(tp):  # a rank that fails to read its slices stops them all, with its message
            check_fits(cfg, dt, tp.device, tp.world)
            model = _load(ckpt, cfg, tp.device, dt, method, tp)
    return for_inference(model, quantize, compile, pack, decode_batch)


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
        dt = str(dtype).removeprefix("torch.")
        raise XllamaError(f"the model's {human_count(n)} parameters ({n:,}) need {human_bytes(need)} in {dt}"
                          f"{f' per rank of {world}' if world > 1 else ''}, but only {human_bytes(free)} is free "
                          f"on {device}; use a smaller --dtype or a machine with more memory")


def for_inference(model: Transformer, quantize: str | None = None, compile: bool = False,
                  pack: bool = True, decode_batch: int | None = 1) -> Transformer:
    """Put a loaded model on its fastest inference path: int8 weights if asked, then either the
    compiled decode step or (without --compile) oneDNN-packed weights. The compiled step keeps
    the plain weights: inductor fuses its one-row products into kernels faster than oneDNN's."""
    if quantize:
        quantize_model(model, quantize)
    if compile:
        model.compile_decode()
    elif pack:
        pack_model(model, decode_batch)
    return model


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
    model = build_model(cfg, _placed(tensors, dev, dt, own=shard is not None), dev, dt)
    if tp is not None:
        make_row_parallel(model)
    model.checkpoint = ckpt
    model.tensor_parallel = tp
    return model


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
