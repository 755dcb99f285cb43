"""One product for the linear layers of a block that read the same input: attention's q, k and v
projections, and the MLP's gate and up. Applied to a built model from outside, as quantize.py's
and linear.py's swaps are.

In a CPU decode step each product costs a call's fixed overhead beside the reading of its
weights, and a small weight is read at less than the memory's pace: one product over the three
(or two) weights stacked is faster than their products one by one (benchmarks/kernels.py
measures it). The block computes with the stacked layer (`Attention.qkv`, `MLP.gate_up`: a
`Stacked`) and keeps its own layers' names, as `Part`s of it, so that state_dict() has the plain
model's keys. Attention's stacked layer gives q and k as one output, so that RoPE turns both in
one go (a decode step's elementwise ops each cost a call's overhead, whatever their size).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from itertools import accumulate
from typing import Callable

import torch
from torch import nn

from .attention import Attention
from .model import MLP, Transformer


class Stacked(nn.Module):
    """Layers that read the same input, as one layer (`layer`: their weights, and every other
    tensor they hold per output, concatenated along the outputs) whose output is split into
    `sizes` columns (a layer's, or neighbours' together). It adds no keys to state_dict(): its
    parts keep the layers' own."""

    def __init__(self, layer: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.layer = layer
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.layer(x).split(self.sizes, -1)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):  # noqa: ANN
        return OrderedDict() if destination is None else destination


class Part(nn.Module):
    """Where one of a Stacked's layers was: its outputs (columns start.. of the stacked
    layer's), its `bias` and the names of its weights (whose values the stacked layer now holds
    in its own form: the part keeps an empty tensor, as linear.CpuLinear does for a packed
    weight)."""

    def __init__(self, source: nn.Module, stacked: Stacked, start: int) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.start = start
        object.__setattr__(self, "stacked", stacked)  # not a child: the block holds it
        for name, t in _tensors(source).items():
            empty = torch.empty(0, dtype=t.dtype, device=t.device)
            if isinstance(t, nn.Parameter):
                setattr(self, name, nn.Parameter(empty, requires_grad=False))
            else:
                self.register_buffer(name, empty)
        if "bias" not in self._parameters:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the block calls the stacked layer itself
        return self.stacked.layer(x)[..., self.start:self.start + self.out_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"columns from {self.start}")


def stack(layers: list[nn.Module]) -> nn.Module | None:
    """The layers as one layer of their type whose outputs are theirs, concatenated; None where
    they differ in type, input, dtype or the tensors they hold. Every tensor a linear layer holds
    (weight, bias, int8 scales, int4 scales and zeros) has one row per output."""
    first = layers[0]
    tensors = [_tensors(layer) for layer in layers]
    if not all(_alike(layer, ts, first, tensors[0]) for layer, ts in zip(layers, tensors)):
        return None
    out = copy.copy(first)  # the same type and settings; its own tensors, set below
    out._parameters, out._buffers, out._modules = OrderedDict(), OrderedDict(), OrderedDict()
    with torch.no_grad():
        for name, t in tensors[0].items():
            whole = torch.cat([ts[name] for ts in tensors])
            if isinstance(t, nn.Parameter):
                out.register_parameter(name, nn.Parameter(whole, requires_grad=False))
            else:
                out.register_buffer(name, whole)
    if "bias" not in out._parameters and "bias" not in out._buffers:
        out.bias = None
    out.out_features = sum(layer.out_features for layer in layers)
    return out


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return dict(layer.named_parameters(recurse=False)) | dict(layer.named_buffers(recurse=False))


def _alike(layer: nn.Module, tensors: dict[str, torch.Tensor], first: nn.Module,
           first_tensors: dict[str, torch.Tensor]) -> bool:
    def same(t: torch.Tensor, u: torch.Tensor) -> bool:
        return t.dtype == u.dtype and t.device == u.device and t.shape[1:] == u.shape[1:]

    return (type(layer) is type(first) and layer.in_features == first.in_features
            and getattr(layer, "dtype", None) == getattr(first, "dtype", None)
            and not layer._modules and tensors.keys() == first_tensors.keys()
            and all(same(t, first_tensors[name]) for name, t in tensors.items()))


def fuse_projections(model: Transformer, release: Callable[[torch.Tensor], None] | None = None
                     ) -> Transformer:
    """Give every block a Stacked for its q, k and v projections (giving q and k as one
    output, then v) and one for its gate and up (giving each), where they can be stacked (the
    same type of layer, dtype and tensors). `release(tensor)` is called for each stacked layer's
    tensors once copied (e.g. to drop a memory-mapped checkpoint's pages, as
    linear.use_cpu_kernels does)."""
    for block in model.model.layers:
        for module, names, slot, joined in (
                (block.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv", 2),
                (block.mlp, ("gate_proj", "up_proj"), "gate_up", 1)):
            assert isinstance(module, (Attention, MLP))
            if getattr(module, slot) is not None:  # fused already
                continue
            layers = [getattr(module, name) for name in names]
            layer = stack(layers)
            if layer is None:
                continue
            widths = [lay.out_features for lay in layers]
            stacked = Stacked(layer, [sum(widths[:joined]), *widths[joined:]])
            setattr(module, slot, stacked)
            for name, source, start in zip(names, layers, accumulate(widths, initial=0)):
                setattr(module, name, Part(source, stacked, start))
                for t in _tensors(source).values() if release is not None else ():
                    release(t)
    return model
