"""Tensor parallelism across processes started by `torchrun` (torch.distributed: NCCL on CUDA,
gloo on CPU).

The split is Megatron's: q/k/v and gate/up projections by output rows (whole heads per rank),
o and down projections by input columns, each followed by one all-reduce (sum) of the partial
outputs. Embeddings, norms and the output head are replicated on every rank. When there are
fewer KV heads than ranks, a KV head is replicated on every rank whose query heads use it.

As in gpt-fast's tp.py, the model stays a plain one: loading reads each rank's slices into a model
of the rank's own size (`plan_shard`), and `apply_tensor_parallel` adds the all-reduce as forward
hooks on each block's attention and MLP. Sampling draws on every rank; the engine is given the
TensorParallel so that every rank takes rank 0's token (`TensorParallel.broadcast`).

Nothing here runs in a single process: `setup()` returns None unless WORLD_SIZE > 1, and the
model then has no hook or collective at all.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig
from . import report
from .errors import XllamaError
from .layout import divisors

GRACE_S = 10  # how long a failed rank other than 0 leaves rank 0 to report the same error
# seconds a rank waits for the others (joining, or in a collective)
TIMEOUT_ENV = "XLLAMA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600
_PROJ = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.(weight|bias)$")


def requested() -> bool:
    """True when this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class TensorParallel:
    """This process's place in the group: rank, world size and the device it computes on."""

    rank: int
    world: int
    device: torch.device

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Overwrite t, on every rank, with rank 0's t."""
        dist.broadcast(t, src=0)
        return t


def setup(device: torch.device) -> TensorParallel | None:
    """Join the process group torchrun describes (once per process); None in a single process.

    Under torchrun a CUDA device becomes cuda:LOCAL_RANK, so ranks on one machine use one GPU each.
    """
    if not requested():
        return None
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            gpus = torch.cuda.device_count()
            raise XllamaError(f"LOCAL_RANK {local} but this machine has {gpus} GPU(s); start at "
                              "most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        # device_id binds NCCL's communicator to this rank's GPU now, rather than to a device it
        # guesses at the first collective (which a rank that has not set its device gets wrong)
        device_id = device if device.type == "cuda" else None
        try:
            dist.init_process_group(backend, timeout=timeout, device_id=device_id)
        except (RuntimeError, ValueError) as e:  # DistNetworkError, DistStoreError: RuntimeErrors
            raise XllamaError(f"cannot join the other ranks with {backend}: "
                              f"{str(e).splitlines()[0]}") from None
        atexit.register(shutdown)
    return TensorParallel(dist.get_rank(), dist.get_world_size(), device)


def shutdown() -> None:
    """Leave together: a rank that tears its gloo connections down while a peer still uses them
    can abort the peer ("terminate called without an active exception"), so meet first."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        else:
            dist.barrier()
    except RuntimeError:
        pass  # a peer is gone already: nothing left to wait for
    dist.destroy_process_group()


@contextmanager
def agree_on_errors(tp: TensorParallel) -> Iterator[None]:
    """Every rank leaves the block the same way: if any rank raised an XllamaError, all raise it.

    Loading is where ranks differ (each reads its own files and slices); without this, the
    failing rank would exit and the others would wait for it in their next collective.
    """
    mine: XllamaError | None = None
    try:
        yield
    except XllamaError as e:
        mine = e
    everyone: list[str | None] = [None] * tp.world
    dist.all_gather_object(everyone, None if mine is None else str(mine))
    failed = [(r, m) for r, m in enumerate(everyone) if m is not None]
    if failed:
        rank, message = failed[0]
        if len(failed) == tp.world and all(m == message for _, m in failed):
            raise mine  # the same error everywhere: as it was raised, for the CLI to word
        raise XllamaError(f"rank {rank}: {message}")


# ---- what one rank holds ----
@dataclass(frozen=True)
class Shard:
    """One rank's part of a model: its own config and the row/column ranges it reads."""

    config: ModelConfig        # rank-local: n_heads / W query heads, its KV heads, hidden_dim / W
    head_dim: int
    kv_groups: int             # the whole model's KV heads after --attn/--groups
    q_heads: tuple[int, int]   # query heads [lo, hi)
    ffn: tuple[int, int]       # FFN rows [lo, hi)
    # source KV heads to read [lo, hi); None: all (they are regrouped first)
    kv_read: tuple[int, int] | None
    kv_pick: tuple[int, ...]   # heads kept, in order, counted from the first head read

    def select(self, name: str) -> tuple[int, int, int] | None:
        """The (dim, start, stop) range of checkpoint tensor `name` this rank reads; None: all of
        it."""
        m = _PROJ.search(name)
        if m is None:
            return None  # embeddings, norms, head: replicated
        kind, what = m.groups()
        d = self.head_dim
        if kind == "q":
            return 0, self.q_heads[0] * d, self.q_heads[1] * d
        if kind in ("k", "v"):
            return None if self.kv_read is None else (0, self.kv_read[0] * d, self.kv_read[1] * d)
        if kind in ("gate", "up"):
            return (0, *self.ffn)
        if what == "bias":
            return None  # o/down biases: whole, added once after the all-reduce
        return (1, self.q_heads[0] * d, self.q_heads[1] * d) if kind == "o" else (1, *self.ffn)

    def take_kv(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of a k/v projection (as read, after regrouping) -> this rank's KV heads."""
        heads = t.reshape(-1, self.head_dim, *t.shape[1:])
        if self.kv_pick == tuple(range(heads.shape[0])):
            return t
        index = torch.tensor(self.kv_pick, device=t.device)
        return heads.index_select(0, index).reshape(-1, *t.shape[1:])


def plan_shard(cfg: ModelConfig, source_kv: int, rank: int, world: int) -> Shard:
    """Rank `rank`'s part of a model with config `cfg` (KV layout already chosen) read from a
    checkpoint that has `source_kv` KV heads."""
    h, n_kv = cfg.n_heads, cfg.n_kv_heads
    if world > h:
        raise XllamaError(f"{world} ranks but the model has only {h} query heads; "
                          f"use a world size that divides {h}: {', '.join(map(str, divisors(h)))}")
    if h % world:
        raise XllamaError(f"world size {world} does not divide the model's {h} query heads; "
                          f"use one of: {', '.join(map(str, divisors(h)))}")
    if cfg.hidden_dim < world:
        raise XllamaError(f"{world} ranks but the FFN has only {cfg.hidden_dim} rows")
    per = h // world
    q = (rank * per, (rank + 1) * per)
    group = h // n_kv  # query heads per KV head
    wanted = [qh // group for qh in range(*q)]  # the KV head of each local query head
    distinct = sorted(set(wanted))
    if wanted == [k for k in distinct for _ in range(per // len(distinct))]:
        kv = distinct  # each local KV head serves an equal run of local query heads
    else:
        kv = wanted    # groups straddle ranks unevenly: one KV head per local query head
    regrouped = source_kv != n_kv  # --attn/--groups: regroup the whole K/V first, then slice
    lo = 0 if regrouped else kv[0]
    ffn = (rank * cfg.hidden_dim // world, (rank + 1) * cfg.hidden_dim // world)
    local = cfg.replace(n_heads=per, n_kv_heads=len(kv), hidden_dim=ffn[1] - ffn[0],
                        head_dim=cfg.head_dim)
    return Shard(local, cfg.head_dim, n_kv, q, ffn, None if regrouped else (kv[0], kv[-1] + 1),
                 tuple(k - lo for k in kv))


def apply_tensor_parallel(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """Make a model loaded with this rank's slices (`plan_shard`) compute the whole model's output:
    each block's o_proj and down_proj see only this rank's input features, so the output of its
    attention and MLP is a partial sum, completed by one all-reduce in a forward hook. Their bias
    moves into the hook, to be added once after the sum rather than once per rank. The hooks sit
    on the attention and MLP modules, so swapping their linear layers (int8, CPU kernels) before
    or after keeps them."""
    for layer in model.model.layers:
        for block, proj in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            linear = getattr(block, proj)
            bias, linear.bias = linear.bias, None
            block.register_forward_hook(_all_reduce_hook(bias))
    return model


def _all_reduce_hook(bias: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    def hook(_module: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out)
        return out if bias is None else out + bias
    return hook


# ---- the command line under torchrun ----
def run_command(app: Callable[[], object]) -> NoReturn:
    """Run the CLI on this rank. A failing rank exits without tearing the group down, so it
    never waits on a peer; torchrun then stops the other ranks (and a peer blocked in a
    collective sees the broken connection, or the timeout). Rank 0 reports errors; another
    rank reports its own only if rank 0 has not ended the run within GRACE_S."""
    try:
        app()
        code = 0
    except SystemExit as e:  # click always ends this way
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # a bug or a lost peer: say which rank, with the traceback
        rank = os.environ.get("RANK", "?")
        sys.stderr.write(f"error: rank {rank} failed:\n{traceback.format_exc()}")
        code = 1
    if code != 0 and report.withheld:
        # Mostly rank 0 meets the same error (a bad argument), says it and exits, and torchrun
        # stops this rank during the wait. Still here: the error was this rank's alone.
        time.sleep(GRACE_S)
        sys.stderr.write(f"error: rank {os.environ.get('RANK', '?')}: {report.withheld[-1]}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        shutdown()
        sys.exit(0)
    os._exit(code)
