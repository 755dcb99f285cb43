"""Bytes a model moves and holds: what a decode step reads (weights, KV cache), what a run needs.

Decoding one token is bound by memory bandwidth: its time is about the bytes a step reads over
the bandwidth. These counts, beside a measured time, say how close a run comes to that bound
(`xllama bench`, benchmarks/decode.py), and let bench skip a run that cannot fit.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .generation import context_length
from .kv_cache import cache_capacity
from .model import Transformer


def weight_bytes_per_step(cfg: ModelConfig, groups: int, batch: int, elsize: int,
                          int8: bool = False) -> int:
    """Bytes of weights one decode step reads, with `groups` KV heads: every parameter once, but
    only B rows of an untied embedding. int8: the projections and the head at one byte a weight,
    and a scale (elsize bytes) per output row (quantize.py)."""
    cfg = cfg.replace(n_kv_heads=groups)
    n = cfg.n_params()
    if not cfg.tie_embeddings:
        n -= (cfg.vocab_size - batch) * cfg.dim
    nbytes = n * elsize
    if int8:
        with torch.device("meta"):
            linears = [m for m in Transformer(cfg).modules() if isinstance(m, nn.Linear)]
        nbytes -= sum(m.weight.numel() * (elsize - 1) - m.out_features * elsize for m in linears)
    return nbytes


def kv_cache_bytes_per_sample(cfg: ModelConfig, groups: int, tokens: int, elsize: int) -> int:
    """The static cache one sequence of `tokens` slots takes: K and V, every layer."""
    return 2 * cfg.n_layers * groups * cfg.head_dim * tokens * elsize


def kv_read_bytes_per_step(cfg: ModelConfig, groups: int, input_len: int, output_len: int,
                           batch: int, elsize: int) -> int:
    """K/V bytes a decode step attends over, averaged over the run's decode steps.

    Step s (0-based) feeds the token at slot input_len + s and attends to input_len + s + 1 slots.
    """
    steps = output_len - 1
    mean_len = input_len + (steps + 1) / 2
    return round(batch * kv_cache_bytes_per_sample(cfg, groups, 1, elsize) * mean_len)


def run_need_bytes(cfg: ModelConfig, groups: int, base_kv: int, input_len: int, output_len: int,
                   batch: int, elsize: int, device: torch.device, cached: int | None = None) -> int:
    """A rough upper estimate of the memory one group count needs beyond the base model; elsize:
    a weight's bytes, cached: a KV cache element's and an activation's (elsize if None)."""
    cached = cached or elsize
    kv_weights = (0 if groups == base_kv
                  else 2 * cfg.n_layers * groups * cfg.head_dim * (cfg.dim + 1) * elsize)
    # the slots generate_tokens allocates, which round the tokens up
    slots = cache_capacity(input_len + output_len, context_length(cfg))
    cache = batch * kv_cache_bytes_per_sample(cfg, groups, slots, cached)
    T = input_len
    acts = batch * T * (6 * cfg.dim + 3 * cfg.hidden_dim + 2 * cfg.n_heads * cfg.head_dim) * cached
    # CPU attention may hold the [B, H, T, T] scores; CUDA kernels (flash / memory-efficient) do not
    scores = batch * cfg.n_heads * T * T * 4 if device.type != "cuda" else 0
    logits = 2 * batch * cfg.vocab_size * 4
    return kv_weights + cache + acts + scores + logits
