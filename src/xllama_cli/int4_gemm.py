"""int4 weights in ATen's int4pack form multiplied by many rows at once (a prompt's): a numba loop
widens a chunk of the weight's rows to bfloat16, which oneDNN's bfloat16 GEMM then multiplies.

ATen's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`) dequantizes each group in registers: the
right thing for a decode step's few rows, which read every weight once, and several times slower
than a bfloat16 GEMM over the same weights for a prompt's, where the widening then costs little
beside the GEMM's arithmetic. The weight stays int4 in memory (each chunk is widened into a
buffer this thread keeps), and the product is a candidate for many rows like any other: linear.py
checks it against the dequantized reference and times it against int4pack's own.

int4pack's CPU form (torch 2.13's `_convert_weight_to_int4pack_for_cpu` with one inner tile), as
packing single values shows: uint8 [N, K / 2] read as blocks of 64 rows, each block [K, 32], byte j
of column k holding row 64b + j in its low nibble and row 64b + 32 + j in its high one; a last
block of fewer rows (N is padded to 16 only) is [K, rows / 2], byte j holding rows 2j and 2j + 1.
`layout_is_known` checks that on the torch in use before the product is offered."""

from __future__ import annotations

import threading
from functools import cache
from typing import Callable

import numpy as np
import torch

from .jit import numba_module, on_torch_threads

BLOCK = 64  # rows in one block of the int4pack form
CHUNK_WEIGHTS = 1 << 21  # weights widened at once (4 MiB of bf16): a chunk the GEMM finds in cache

_buffers = threading.local()


@cache
def _loop() -> Callable[..., None] | None:
    """The compiled loop, or None where numba is not usable (jit.numba_module)."""
    numba = numba_module()
    if numba is None:
        return None

    # unsigned indices: with signed ones numba checks each for wrapping around, and LLVM then
    # does not vectorize the loop (2.5x slower here)
    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False)
    def widen(packed, scales, zeros, first, out):
        """packed uint8 [N * K / 2] (int4pack's form, flat); scales, zeros float32 [groups, N];
        out uint16 [K, rows]: the bf16 bits of the weight's rows first..first+rows-1 (first a
        multiple of BLOCK), transposed, each w = (q - 8) * scale + zero rounded to nearest even."""
        K, rows = out.shape
        N = scales.shape[1]
        group = K // scales.shape[0]
        for k in numba.prange(K):
            s, z, o = scales[k // group], zeros[k // group], out[k]
            values = np.empty(BLOCK, np.float32)
            bits = values.view(np.uint32)
            for b in range(-(-rows // BLOCK)):
                n = np.uint64(first + b * BLOCK)
                size = np.uint64(min(BLOCK, N - (first + b * BLOCK)))
                half = size // np.uint64(2)
                column = packed[n * np.uint64(K // 2) + np.uint64(k) * half:][:half]
                if size == BLOCK:  # byte j: rows j (low nibble) and j + 32 (high)
                    for j in range(half):
                        byte = np.int32(column[j])
                        values[j] = np.float32((byte & 15) - 8) * s[n + j] + z[n + j]
                        values[half + j] = (np.float32((byte >> 4) - 8) * s[n + half + j]
                                            + z[n + half + j])
                else:  # a last, partial block: byte j holds rows 2j and 2j + 1
                    for j in range(half):
                        byte = np.int32(column[j])
                        i = np.uint64(2) * j
                        values[i] = np.float32((byte & 15) - 8) * s[n + i] + z[n + i]
                        values[i + 1] = (np.float32((byte >> 4) - 8) * s[n + i + 1]
                                         + z[n + i + 1])
                at = np.uint64(b * BLOCK)
                for j in range(size):
                    u = bits[j]
                    o[at + j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16))
                                                                   & np.uint32(1)))
                                          >> np.uint32(16))

    return on_torch_threads(widen)


def widened_rows(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, first: int,
                 rows: int) -> torch.Tensor:
    """Rows first..first+rows-1 (first a multiple of BLOCK) of an int4pack weight (its packed
    form, and float32 scales and zeros [groups, N padded]) as bf16 [K, rows]: a view of this
    thread's buffer, overwritten by its next call."""
    k = packed.shape[1] * 2
    out = scratch(k * rows).view(k, rows)
    _loop()(packed.view(-1).numpy(), scales.numpy(), zeros.numpy(), first, out.numpy())
    return out.view(torch.bfloat16)


def scratch(size: int) -> torch.Tensor:
    """`size` uint16 of this thread's buffer for widened weights (at least CHUNK_WEIGHTS long,
    kept for the next chunk), which every widening product here and in vnni.py fills."""
    buffer = getattr(_buffers, "widened", None)
    if buffer is None or buffer.numel() < size:
        buffer = _buffers.widened = torch.empty(max(size, CHUNK_WEIGHTS), dtype=torch.uint16)
    return buffer[:size]


def widened_int4pack_linear(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, int]
                            ) -> torch.Tensor:
    """x [R, K] @ W.T for a weight in int4pack's layout (quantize.int4pack: the packed form, its
    scales and zeros [groups, N padded, 2], the true N), widened to bf16 a chunk of rows at a
    time, each chunk multiplied by oneDNN's bf16 GEMM; y in x's dtype."""
    packed, sz, n = state
    scales, zeros = sz[..., 0].float().contiguous(), sz[..., 1].float().contiguous()
    xb = x.to(torch.bfloat16)
    step = max(BLOCK, CHUNK_WEIGHTS // x.shape[-1] // BLOCK * BLOCK)
    padded = packed.shape[0]
    parts = [torch.matmul(xb, widened_rows(packed, scales, zeros, first,
                                           min(step, padded - first)))
             for first in range(0, padded, step)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    return (y if y.shape[-1] == n else y[:, :n]).to(x.dtype)


def fits(n: int, k: int) -> bool:
    """Whether the product serves an N x K int4pack weight here: numba usable, and int4pack's
    form as this module reads it."""
    return _loop() is not None and layout_is_known()


@cache
def layout_is_known() -> bool:
    """Whether this torch packs int4 weights as the module's docstring says."""
    n, k = 2 * BLOCK + 16, 64  # two whole blocks and a partial one
    q = torch.arange(n * k, dtype=torch.int32).view(n, k) * 7 % 16
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    except Exception:  # noqa: BLE001 - no such op in this torch
        return False
    if packed.dtype != torch.uint8 or packed.numel() != n * k // 2:
        return False
    flat = packed.view(-1)
    whole = flat[:2 * BLOCK * k // 2].view(2, k, BLOCK // 2)
    want = q[:2 * BLOCK].view(2, 2, BLOCK // 2, k).transpose(2, 3).to(torch.uint8)
    tail = flat[2 * BLOCK * k // 2:].view(k, 8)
    pairs = q[2 * BLOCK:].view(8, 2, k).permute(2, 0, 1).to(torch.uint8)  # [k, j, low|high]
    return (torch.equal(whole & 15, want[:, 0]) and torch.equal(whole >> 4, want[:, 1])
            and torch.equal(tail & 15, pairs[..., 0]) and torch.equal(tail >> 4, pairs[..., 1]))
