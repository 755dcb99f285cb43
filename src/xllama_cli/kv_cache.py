"""A preallocated key/value cache, written in place, sized to what is asked of it."""

from __future__ import annotations

import torch
from torch import nn

MIN_CAPACITY = 256  # slots: smaller caches cost next to nothing and would only grow again at once


def cache_capacity(tokens: int, limit: int) -> int:
    """Slots to allocate for `tokens` tokens: the next power of two (at least MIN_CAPACITY), never
    more than `limit` (the context), never fewer than `tokens`.

    Powers of two make growth a doubling, so a conversation that grows to n tokens copies its
    cache O(log n) times, and a compiled step meets O(log n) cache shapes (one compile each);
    the price, above the floor, is at most twice the slots the tokens need."""
    capacity = max(MIN_CAPACITY, 1 << max(tokens - 1, 0).bit_length())
    return max(tokens, min(capacity, limit))


class KVCache(nn.Module):
    """Keys and values of one layer: [batch, n_kv_heads, max_len, head_dim], allocated up front and
    grown (copied into a bigger buffer) only when asked."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @torch.no_grad()
    def grow(self, max_len: int) -> None:
        """Make room for `max_len` slots, keeping every slot there is. The new slots are zeros, not
        garbage: a masked slot's value still meets a zero weight in attention, and 0 * NaN is
        NaN."""
        for name in ("k", "v"):  # one buffer at a time, so the old and new copies overlap least
            old = getattr(self, name)
            new = torch.zeros((*old.shape[:2], max_len, old.shape[3]), dtype=old.dtype,
                              device=old.device)
            new[:, :, :old.shape[2]] = old
            setattr(self, name, new)

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int = 0,
               span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, D] into cache rows row..row+B-1 and return those rows' slots
        that attention reads (views of the cache, not copies).

        start int: every row's T tokens at slots start..start+T-1; returns slots 0..start+T-1.
        start [B] tensor: row b's at slots start[b]..start[b]+T-1 (an indexed write, so the
        compiled step keeps static shapes); returns slots 0..span-1, of which the caller masks
        those a row has not filled."""
        B, T = k.shape[0], k.shape[2]
        keys, values = self.k, self.v
        if row or B != keys.shape[0]:  # some of the cache's rows
            keys, values = keys[row:row + B], values[row:row + B]
        if isinstance(start, torch.Tensor):
            slots = start[:, None] + torch.arange(T, device=k.device)  # [B, T]
            rows = torch.arange(B, device=k.device)[:, None]
            # indexing rows and slots (dims 0 and 2) puts them first: [B, T, n_kv, D]
            keys[rows, :, slots] = k.transpose(1, 2)
            values[rows, :, slots] = v.transpose(1, 2)
            return keys[:, :, :span], values[:, :, :span]
        end = start + T
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]
