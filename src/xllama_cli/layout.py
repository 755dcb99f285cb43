"""K/V head layout: a requested layout (MHA/GQA/MQA, a group count) to a KV head count, and the
regrouping of K/V weights.

`generate` applies it at load time and `convert` writes its result: one implementation.
Groups are contiguous heads: head i belongs to group i // (n_kv // G), which is how the
attention shares K/V heads among query heads.
"""

from __future__ import annotations

import re

import torch

from .errors import SettingError

ATTN_LAYOUTS = ("MHA", "GQA", "MQA")
METHODS = ("mean", "first", "random")
KV_KEY = re.compile(r"\.self_attn\.[kv]_proj\.(weight|bias)$")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_groups(n_heads: int, n_kv: int) -> list[int]:
    """Group counts reachable from n_kv heads: divisors of n_kv (pooling) or multiples of it
    (repeating)."""
    return [d for d in divisors(n_heads) if n_kv % d == 0 or d % n_kv == 0]


def target_kv_heads(n_heads: int, n_kv: int, attn: str | None, groups: int | None) -> int:
    """The KV head count that layout `attn` and group count `groups` ask for (n_kv when neither
    is given)."""
    if attn is None:
        if groups is None:
            return n_kv
        attn = "GQA"
    name = attn.upper()
    if name not in ATTN_LAYOUTS:
        raise SettingError("unknown {attn} {value!r}; choose one of: {valid}",
                           value=attn, valid=", ".join(ATTN_LAYOUTS))
    if name == "MHA":
        g = n_heads
    elif name == "MQA":
        g = 1
    else:
        g = groups if groups is not None else min(8, n_heads)
    if groups is not None and name != "GQA" and groups != g:
        raise SettingError("{groups} {value} contradicts {attn} {name} (which means {g} KV heads)",
                           value=groups, name=name, g=g)
    valid = valid_groups(n_heads, n_kv)
    if g not in valid:
        why = ("does not divide" if g <= 0 or n_heads % g
               else f"cannot be made from the checkpoint's {n_kv} KV heads for")
        raise SettingError("{groups} {g} {why} the {n_heads} query heads; "
                           "valid group counts: {valid}",
                           g=g, why=why, n_heads=n_heads, valid=", ".join(map(str, valid)))
    return g


def regroup_kv(w: torch.Tensor, n_kv: int, groups: int, method: str = "mean",
               generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows of a k/v projection (weight [n_kv*D, dim] or bias [n_kv*D]) -> `groups` heads.

    Down: each new head is built from the n_kv/groups heads of its group (mean in float32,
    the first head, or random weights at the source's scale). Up: each head is repeated,
    which leaves the model's output unchanged. Returned in `dtype` (default: w's).
    """
    dtype = dtype or w.dtype
    if method not in METHODS:
        raise SettingError("unknown {method} {value!r}; choose one of: {valid}",
                           value=method, valid=", ".join(METHODS))
    if groups == n_kv:
        return w.to(dtype)
    heads = w.reshape(n_kv, -1, *w.shape[1:])  # [n_kv, D, ...]
    if groups > n_kv:
        return heads.repeat_interleave(groups // n_kv, dim=0).reshape(-1, *w.shape[1:]).to(dtype)
    grouped = heads.reshape(groups, n_kv // groups, *heads.shape[1:])
    if method == "mean":
        out = grouped.float().mean(dim=1)
    elif method == "first":
        out = grouped[:, 0]
    else:
        std = w.float().std()
        out = torch.randn(grouped[:, 0].shape, generator=generator, dtype=torch.float32) * std
    return out.to(device=w.device, dtype=dtype).reshape(-1, *w.shape[1:])


def is_kv_param(name: str) -> bool:
    return KV_KEY.search(name) is not None
