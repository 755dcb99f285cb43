"""The one stream of checked tensors from a checkpoint to a model of a target config.

Loading (`loading.load_model`) and conversion (`convert.convert_checkpoint`) read a checkpoint
through `checked_tensors`: the same tensors skipped, the same K/V regrouping (layout.regroup_kv),
the same shape checks against the config and the same error messages. Each tensor is yielded
as soon as it is read and checked, so neither holds the checkpoint twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch

from .build import expected_shapes
from .config import ModelConfig
from .errors import XllamaError
from .layout import is_kv_param, regroup_kv

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, Part


class Shard(Protocol):
    """What one tensor-parallel rank reads of a checkpoint (parallel.Shard)."""

    kv_groups: int  # the whole model's KV heads after regrouping
    kv_read: tuple[int, int] | None  # source KV heads read [lo, hi); None: all of them

    def select(self, name: str) -> Part | None: ...

    def take_kv(self, t: torch.Tensor) -> torch.Tensor: ...


def skipped(name: str, cfg: ModelConfig) -> bool:
    """Tensors some checkpoints hold that a model does not load: RoPE frequencies (derived from
    the config) and the head of a tied model (the embedding's own tensor)."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings)


def checked_tensors(ckpt: Checkpoint, cfg: ModelConfig, *, method: str = "mean",
                    generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                    shard: Shard | None = None, on_read: Callable[[int], object] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor a model of `cfg` holds, read from `ckpt` (whose own config
    may differ from `cfg` only in its KV heads and RoPE), each checked against `cfg`'s shapes.

    K/V projections are regrouped from the checkpoint's heads to `cfg`'s with `method` (random
    draws from `generator`), in `dtype` (None: the source's); every other tensor is as read.
    shard: read one tensor-parallel rank's slices only (then `cfg` is the rank's own config).
    on_read(bytes): called with the size of each tensor as read, skipped ones included.
    After the last tensor, a checkpoint that lacks some is refused.
    """
    expected = expected_shapes(cfg)
    seen: set[str] = set()
    for name, t in ckpt.tensors(shard.select if shard else None):
        if on_read is not None:
            on_read(t.numel() * t.element_size())
        if skipped(name, cfg):
            continue
        if name not in expected:
            raise XllamaError(f"{ckpt.path}: unexpected tensor {name!r} for a Llama model")
        if is_kv_param(name):
            t = _kv(ckpt, cfg, name, t, method, generator, dtype, shard)
        if tuple(t.shape) != expected[name]:
            raise XllamaError(f"{ckpt.path}: {name} has shape {tuple(t.shape)} but the config "
                              f"implies {expected[name]}; config and weights do not match")
        seen.add(name)
        yield name, t
    missing = sorted(set(expected) - seen)
    if missing:
        raise XllamaError(f"{ckpt.path}: weights lack {len(missing)} tensors, e.g. {missing[0]!r}")


def _kv(ckpt: Checkpoint, cfg: ModelConfig, name: str, t: torch.Tensor, method: str,
        generator: torch.Generator | None, dtype: torch.dtype | None,
        shard: Shard | None) -> torch.Tensor:
    """A k/v projection as read (all of the source's heads, or the rank's range of them) -> the
    target's heads (the rank's own). The layout applies to the whole K/V: a rank reads all of it
    when the layout changes, and takes its heads after."""
    src_kv = ckpt.config.n_kv_heads
    lo, hi = (shard.kv_read if shard else None) or (0, src_kv)
    if t.shape[0] != (hi - lo) * cfg.head_dim:
        raise XllamaError(f"{ckpt.path}: {name} has {t.shape[0]} rows but the config implies "
                          f"{(hi - lo) * cfg.head_dim}; config and weights do not match")
    groups = shard.kv_groups if shard else cfg.n_kv_heads
    t = regroup_kv(t, src_kv, groups, method, generator, dtype=dtype)
    return shard.take_kv(t) if shard else t
