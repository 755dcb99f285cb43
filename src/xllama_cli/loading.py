"""load: a checkpoint -> a Transformer on the chosen device, dtype, K/V layout and RoPE, with the
runtime plug-ins applied (int8, CPU kernels, tensor parallel hooks, a compiled decode step).

Under torchrun (WORLD_SIZE > 1) each rank builds and reads only its own part of the model
(see parallel.py); in a single process nothing of that runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .checkpoint import Checkpoint, open_checkpoint, release_pages, return_free_heap
from .build import build_model
from .config import ModelConfig
from .cpu_attention import use_fused_attention
from .cpu_block import prefer_loops, use_block_step
from .errors import SettingError, XllamaError
from .fuse import fuse_projections
from .kernel_cache import KernelCache
from .linear import COMPILED, Chooser, Tuner, fixed, kind_of, use_cpu_kernels
from .machine import OtherWork, available_bytes, last_level_cache_bytes, native_bf16
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


def resolve_dtype(dtype: str, device: torch.device, quantize: str | None = None,
                  stored: torch.dtype | None = None) -> torch.dtype:
    """--dtype as a torch dtype. auto: bfloat16 on CUDA and for quantized weights (which compute
    in it on every device); on the CPU, bfloat16 for a checkpoint `stored` in bfloat16 or float16
    where the CPU computes bfloat16 natively (said once on stderr, with why), else float32."""
    if dtype == "auto":
        if device.type == "cuda" or quantize:
            return torch.bfloat16
        if stored in (torch.bfloat16, torch.float16):
            return _cpu_auto_dtype(str(stored).removeprefix("torch."), native_bf16())
        return torch.float32
    if dtype not in DTYPES:
        raise SettingError("unknown {dtype} {value!r}; choose auto, {valid}",
                           value=dtype, valid=", ".join(DTYPES))
    return DTYPES[dtype]


_SAID: set[str] = set()


def _cpu_auto_dtype(stored: str, native: bool) -> torch.dtype:
    if native:
        line = (f"--dtype auto: bfloat16 (a {stored} checkpoint, and this CPU computes bfloat16 "
                "natively)")
    else:
        line = (f"--dtype auto: float32 (a {stored} checkpoint, but this CPU has no native "
                "bfloat16 (AVX-512 BF16 or AMX); --dtype bfloat16 halves the memory, slower)")
    if line not in _SAID:  # once a process (a chat, a server loads again)
        _SAID.add(line)
        report.info(line)
    return torch.bfloat16 if native else torch.float32


def stored_dtype(ckpt: Checkpoint) -> torch.dtype | None:
    """The dtype of the checkpoint's first floating-point tensor (None: it has none). The
    tensors are memory-mapped: this reads a header, no weights."""
    tensors = ckpt.tensors()
    try:
        return next((t.dtype for _, t in tensors if t.is_floating_point()), None)
    finally:
        tensors.close()


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
    rope, rope_factor: the RoPE rule (rope.with_rope). quantize="int8" or "int4": weight-only
    quantized projections and head (quantize.py), computing in bfloat16 unless `dtype` says
    float16. compile: torch.compile the decode step (`loaded.step`). pack: on the CPU, the CPU
    kernels measured fastest for `decode_batch` sequences decoded together (None: no decoding, as
    in perplexity; see `for_inference`); False: the plain model, for training or taking tensors
    from (`state_dict`).

    Started by torchrun, it gives this rank's part of the model (`loaded.tp` set, `model.config`
    the rank's own); every rank must call it.
    """
    kernels_mode()  # a bad XLLAMA_KERNELS fails before any work
    ckpt = open_model(source)
    cfg = target_config(ckpt, attn, groups, rope, rope_factor)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, quantize, stored_dtype(ckpt) if dtype == "auto" else None)
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
    """Put a built model on its fastest inference path, plug-in by plug-in: int8 or int4 weights
    if asked (quantize_model); unless `pack` is False, the CPU kernels (use_cpu_kernels) measured
    fastest on this machine for `decode_batch` sequences decoded together (the times kept in the
    user's cache folder: kernel_cache.py; XLLAMA_KERNELS: kernels_mode), each block's q, k and v
    (and gate and up) as one product (fuse_projections), with float32 activations beside
    half-precision or quantized weights (cpu_activations), and a decode step's attention as one
    loop where measured faster (use_fused_attention), and then, where every product of a block
    is a numba loop, the block's step as one numba call where measured faster (use_block_step),
    or under `compile`
    the plain weights, whose one-row products inductor fuses into kernels of its own; then the
    compiled decode step if asked (under tensor parallelism without CUDA graphs: see
    generation.compile_options)."""
    if quantize:
        quantize_model(model, quantize)
    mode = kernels_mode()
    if pack and mode != "plain":
        if compile:
            use_cpu_kernels(model, choose=fixed(COMPILED))
        else:
            cache = KernelCache()
            if mode == "measure":
                cache.entries.clear()
            tuner = cpu_tuner(decode_batch, cache)
            use_cpu_path(model, tuner, _released)
            if use_fused_attention(model, tuner):
                use_block_step(model, tuner)
            cache.save()
    step = None
    if compile:
        from .generation import compile_decode

        if tensor_parallel and model.lm_head.weight.device.type == "cuda":
            report.info("compiled decode step under tensor parallelism: no CUDA graphs (an "
                        "all-reduce is not captured in one)")
        step = compile_decode(model, tensor_parallel=tensor_parallel)
    return Loaded(model, step)


def cpu_activations(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The activations' dtype of the CPU kernels' path for a model of `dtype` on `device`:
    float32 for half-precision weights (or quantized ones, which compute in half precision),
    as llama.cpp's products take them (norms, RoPE, attention and the residual stream in half
    precision cost a decode step more there than the products' conversions; the KV cache is
    float32 too); else None, the weights' own dtype."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return None


def use_cpu_path(model: Transformer, choose: Chooser | Tuner,
                 release: Callable[[torch.Tensor], None] | None = None, *, fuse: bool = True,
                 float32: bool = True) -> None:
    """for_inference's CPU kernels, each layer's chosen by `choose`: a Tuner (whose choices give
    the blocks' products the numba loops where the block step over them was measured faster:
    cpu_block.prefer_loops), or a Chooser (linear.fixed); unless `fuse` is False, each block's
    q, k and v (and gate and up) as one product; the kernels chosen for float32 inputs beside
    half-precision weights (cpu_activations) unless `float32` is False, and the model then
    computing in float32 if every linear layer took a kernel (a layer left as it is computes in
    its own dtype only, so the model then stays in it). `release`: as use_cpu_kernels's."""
    weight = model.model.embed_tokens.weight  # quantized models keep it in their compute dtype
    activations = cpu_activations(weight.device, weight.dtype) if float32 else None
    if fuse and weight.device.type == "cpu":
        fuse_projections(model, release=release)
    if isinstance(choose, Tuner):
        choose = prefer_loops(model, choose, activations)
    use_cpu_kernels(model, choose=choose, release=release, activations=activations)
    if activations is not None and not any(kind_of(m) for m in model.modules()):
        model.compute_in(activations)


KERNELS_VARIABLE = "XLLAMA_KERNELS"


def _released(t: torch.Tensor) -> None:
    """A source weight copied into its kernel's form: its file's pages, and the heap that the
    copies before it freed, leave resident memory, so that a load peaks near the weights' size."""
    release_pages(t)
    return_free_heap()


def kernels_mode() -> str:
    """XLLAMA_KERNELS: "auto" (unset or empty too) for the CPU kernels measured fastest, kept in
    the user's cache folder; "measure" to measure them again now (e.g. after the first load ran
    beside other work) and keep those; "plain" for none (every layer's own product)."""
    value = os.environ.get(KERNELS_VARIABLE, "") or "auto"
    if value not in ("auto", "measure", "plain"):
        raise XllamaError(f"{KERNELS_VARIABLE}={value!r} is not a setting; use auto (the default: "
                          "the kernels measured fastest), measure (measure them again) or plain "
                          "(no CPU kernels)")
    return value


def cpu_tuner(decode_batch: int | None, store: KernelCache) -> Tuner:
    """The Tuner for this machine: a few-row product timed over twice the CPU's last cache of the
    model's weights of its shape (as many as it has), as decode streams them; times taken while
    other processes kept the CPUs busy are used but not kept."""
    return Tuner(store, decode_batch, 2 * last_level_cache_bytes(), OtherWork)


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
