"""A CPU decode step's attention as one numba loop: RoPE on each row's new q and k, its k and v
written into the cache, and every query head's attention over the row's slots, in one call.

Done with ATen, that is some twenty ops a layer (views, RoPE's products and halves, two cache
writes, SDPA), each paying a call's fixed cost, and SDPA's CPU kernel, built for long queries,
pays more again for one query. For a float32 cache the loop is applied to a built model from
outside (`use_fused_attention`), as fuse.py's stacked layers are: each block's Attention computes
with it (`Attention.fused_step`) where it serves, keeping its plain path for everything else
(prompts, other dtypes and devices, sliding windows). Like the products, it is checked against
that plain path on the model's shapes, and used only where measured faster on this machine
(times kept with the products' in the kernel cache)."""

from __future__ import annotations

import statistics
import time
from functools import cache
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .attention import Attention
from .config import ModelConfig
from .fuse import Stacked
from .jit import numba_module, on_torch_threads
from .kv_cache import KVCache
from .linear import Tuner, agrees
from .model import Transformer

ROUNDS = 15  # alternating timings of each path in a measurement; the median is compared
TIMED_SLOTS = 512  # filled cache slots a timed step attends over (at most the model's context)


@cache
def _loop() -> Callable[..., bool] | None:
    """The compiled loop, or None where numba is not usable (jit.numba_module)."""
    numba = numba_module()
    if numba is None:
        return None

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def attend(qkv, cos, sin, kc, vc, row, pos, out):
        """qkv float32 [B, (H + 2 Hk) D]: each row's q, k and v heads (fuse.py's stacked
        output); cos, sin [B, D] (RotaryEmbedding's: sin's first half negated); kc, vc
        [rows, Hk, S, D], the cache, whose rows row..row+B-1 take row b's k and v at slot
        pos[b]; out [B, H D]: each row's attention over its slots 0..pos[b]. False, and nothing
        written, where a slot is not in the cache."""
        B = qkv.shape[0]
        Hk, S, D = kc.shape[1], kc.shape[2], kc.shape[3]
        H = out.shape[1] // D
        G, half = H // Hk, D // 2
        for b in range(B):
            if pos[b] < 0 or pos[b] >= S:
                return False
        for b in range(B):
            p = pos[b]
            for h in range(Hk):
                k0, v0 = (H + h) * D, (H + Hk + h) * D
                for d in range(half):  # as apply_rope: x * cos + swap_halves(x) * sin
                    x1, x2 = qkv[b, k0 + d], qkv[b, k0 + half + d]
                    kc[row + b, h, p, d] = x1 * cos[b, d] + x2 * sin[b, d]
                    kc[row + b, h, p, half + d] = x2 * cos[b, half + d] + x1 * sin[b, half + d]
                for d in range(D):
                    vc[row + b, h, p, d] = qkv[b, v0 + d]
        scale = np.float32(1.0 / np.sqrt(D))
        for bh in numba.prange(B * H):
            b, hq = bh // H, bh % H
            h, q0, n = hq // G, hq * D, pos[bh // H] + 1
            q = np.empty(D, np.float32)
            for d in range(half):
                x1, x2 = qkv[b, q0 + d], qkv[b, q0 + half + d]
                q[d] = (x1 * cos[b, d] + x2 * sin[b, d]) * scale
                q[half + d] = (x2 * cos[b, half + d] + x1 * sin[b, half + d]) * scale
            weights = np.empty(n, np.float32)
            top = np.float32(-np.inf)
            for s in range(n):
                a = np.float32(0.0)
                for d in range(D):
                    a += q[d] * kc[row + b, h, s, d]
                weights[s] = a
                top = max(top, a)
            total = np.float32(0.0)
            for s in range(n):
                e = np.exp(weights[s] - top)
                weights[s] = e
                total += e
            acc = np.zeros(D, np.float32)
            for s in range(n):
                w = weights[s]
                for d in range(D):
                    acc[d] += w * vc[row + b, h, s, d]
            for d in range(D):
                out[b, q0 + d] = acc[d] / total
        return True

    return on_torch_threads(attend)


class FusedStep:
    """An Attention's one-token step through the loop (`Attention.fused_step`), shared by a
    model's layers. What every layer of a step takes alike (cos, sin, the rows' slots) is
    converted once a step, and the layers write their outputs into one buffer, which each
    layer's o_proj has read before the next layer writes it."""

    def __init__(self) -> None:
        self._step: tuple[torch.Tensor, Any, Any, Any] | None = None  # cos, and its arrays
        self._out: tuple[torch.Tensor, Any] | None = None

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                 start: int | torch.Tensor, row: int) -> torch.Tensor:
        """qkv [B, 1, (H + 2 Hk) D] -> attention's output [B, 1, H D]; start as
        KVCache.update's (an int, or each row's slot)."""
        B = qkv.shape[0]
        cos_rows, sin_rows, pos = self.step_arrays(cos, sin, start, B)
        k, v = cache.k, cache.v
        width = qkv.shape[-1] - 2 * k.shape[1] * k.shape[3]
        if self._out is None or self._out[0].shape != (B, width):
            out = torch.empty(B, width, dtype=torch.float32)
            self._out = (out, out.numpy())
        out, array = self._out
        if row < 0 or row + B > k.shape[0] or not _loop()(
                _rows(qkv, B), cos_rows, sin_rows, k.numpy(), v.numpy(), row, pos, array):
            raise slots_error(pos, row, cache)
        return out.view(B, 1, width)

    def step_arrays(self, cos: torch.Tensor, sin: torch.Tensor, start: int | torch.Tensor,
                    rows: int) -> tuple[Any, Any, Any]:
        """The loop's arrays of this step: cos and sin float32 [rows, D] and each row's slot
        (int64 [rows]), converted at the step's first layer and reused by the others."""
        step = self._step
        if step is None or step[0] is not cos:  # a new step
            pos = (np.full(rows, start, np.int64) if isinstance(start, int)
                   else start.to(torch.int64).numpy())
            step = self._step = (cos, _rows(cos, rows), _rows(sin, rows), pos)
        return step[1:]


def slots_error(pos: Any, row: int, cache: KVCache) -> IndexError:
    """The error of a step whose slots (or rows) are not in the cache."""
    k = cache.k
    return IndexError(f"cache slots {pos.tolist()} of rows {row}..{row + len(pos) - 1} are not in "
                      f"a cache of {k.shape[0]} rows and {k.shape[2]} slots")


def _rows(t: torch.Tensor, rows: int) -> Any:
    """t [rows, 1, ..., n] as a contiguous float32 array [rows, n]."""
    t = t.view(rows, -1) if t.is_contiguous() else t.reshape(rows, -1).contiguous()
    return t.numpy()


def served(model: Transformer) -> list[nn.Module]:
    """The blocks whose decode steps the loop can serve: in a model computing in float32 (its
    cache is then float32), those with q, k and v from one product on the CPU, attention over
    every slot (no sliding window) and an even head_dim."""
    if model.activation_dtype != torch.float32 or _loop() is None:
        return []
    return [b for b in model.model.layers if serves_block(b)]


def serves_block(block: nn.Module) -> bool:
    """Whether the loop can serve a block of a model computing in float32 (served)."""
    attn = block.self_attn
    return (isinstance(attn.qkv, Stacked) and block.window is None and attn.head_dim % 2 == 0
            and attn.qkv.layer.weight.device.type == "cpu")


def random_cache(cfg: ModelConfig, rows: int, slots: int, gen: torch.Generator) -> KVCache:
    """A float32 cache of `rows` rows and `slots` slots of the model's K/V heads, every slot
    filled at random (a timed step's)."""
    cache = KVCache(rows, cfg.n_kv_heads, slots, cfg.head_dim, torch.float32, "cpu")
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    return cache


def use_fused_attention(model: Transformer, tuner: Tuner) -> bool:
    """Give every block the loop serves (`served`) the fused step, where it agrees with the plain
    path on the model's shapes and is the faster for the tuner's decode rows here: as kept in its
    store, else measured now (and kept as the tuner keeps a product's times). Whether it was
    given."""
    if not served(model) or tuner.decode_rows is None:
        return False
    cfg, rows = model.config, tuner.decode_rows
    slots = min(TIMED_SLOTS, cfg.max_seq_len)
    key = (f"attention {cfg.n_heads}x{cfg.head_dim} heads {cfg.n_kv_heads} kv rows {rows} "
           f"threads {torch.get_num_threads()} slots {slots}")
    step = FusedStep()
    plain, fused = _bench(model, step, rows, slots)
    if not agrees(fused(), plain()):
        return False
    times = kept_or_timed(tuner, key, "attention", lambda: {"plain": plain, "fused": fused})
    if times is None or times["fused"] >= times["plain"]:
        return False
    give_fused_step(model, step)
    return True


def give_fused_step(model: Transformer, step: FusedStep | None = None) -> int:
    """Give every block the loop serves (`served`) `step` (a new one by default), unmeasured;
    how many."""
    step = step or FusedStep()
    blocks = served(model)
    for block in blocks:
        block.self_attn.fused_step = step
    return len(blocks)


class _Given(nn.Module):
    """A stand-in for a stacked product: gives the same output whatever its input."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def _bench(model: Transformer, step: FusedStep, rows: int, slots: int
           ) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """A step of one of the model's attention layers over `slots` filled slots, without its
    products: by the plain path, and by the fused step (each writing the same new slot)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        attn = Attention(cfg)
    H, Hk, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qkv = torch.randn(rows, 1, (H + 2 * Hk) * D, generator=gen)
    attn.qkv = Stacked(_Given(qkv), [(H + Hk) * D, Hk * D])
    attn.o_proj = nn.Identity()
    attn.kv_cache = random_cache(cfg, rows, slots, gen)
    start = slots - 1
    cos, sin = model.model.rotary(torch.full((rows, 1), start), torch.float32)

    def run(fused: bool) -> torch.Tensor:
        attn.fused_step = step if fused else None
        with torch.inference_mode():
            return attn(qkv, cos, sin, None, start)

    return (lambda: run(False)), (lambda: run(True))


def kept_or_timed(tuner: Tuner, key: str, name: str,
                  paths: Callable[[], dict[str, Callable[[], torch.Tensor]] | None],
                  names: tuple[str, ...] = ("plain", "fused")) -> dict[str, float] | None:
    """Median seconds a call of each of `names`' paths, kept under `key` as the Tuner keeps a
    product's ({name: {"few": {path: s}}}): from the tuner's store, else paths() timed now
    (time_paths) and kept; None where paths() gives None (they could not be built, say)."""
    kept = tuner.store.get(key)
    times = kept["times"].get(name, {}).get("few", {}) if kept else {}
    if times.keys() == set(names):
        return times
    built = paths()
    if built is None:
        return None
    return tuner.timed(key, lambda: {name: {"few": time_paths(built)}})[name]["few"]


def time_paths(paths: dict[str, Callable[[], torch.Tensor]]) -> dict[str, float]:
    """Median seconds a call of each path, timed in turn, ROUNDS times."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(ROUNDS):
        for name, path in paths.items():
            path()  # the first call of a round fetches what the other path evicted
            t = time.perf_counter()
            path()
            path()
            times[name].append((time.perf_counter() - t) / 2)
    return {name: statistics.median(ts) for name, ts in times.items()}
