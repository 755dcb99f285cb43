"""A Transformer from named tensors, and the names and shapes a model of a config holds.

Every model xllama makes (loaded from a checkpoint, random for bench, regrouped from another) is
built the same way: the modules on the meta device (no memory, no initialisation), the tensors
assigned as they are, the head tied, the RoPE frequencies computed on the device. Runtime
choices (packing, int8, tensor parallelism, compilation) are applied to the result afterwards.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .config import ModelConfig
from .model import Transformer

Tensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `cfg` holds, under HF's names, with its shape; a tied head is
    the embedding's own tensor and has no entry."""
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def build_model(cfg: ModelConfig, tensors: Tensors, device: torch.device | str,
                dtype: torch.dtype) -> Transformer:
    """A Transformer of `cfg` in eval mode, without gradients, holding `tensors` (a mapping or
    (name, tensor) pairs, as many as expected_shapes names) on `device` in `dtype`. Tensors already
    there are used as they are, not copied; a tied head may be given or left out."""
    with torch.device("meta"):
        model = Transformer(cfg)
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    state = {name: t.to(device=device, dtype=dtype) for name, t in pairs}
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    # a caller's bug: a model must never keep a tensor on the meta device
    if missing or unexpected:
        raise ValueError(f"tensors for a model of this config lack {missing[:3]} and have "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    model.init_rope(device)
    return model.eval().requires_grad_(False)
