"""Facts about the machine a model runs on: free and total memory, memory bandwidth, what it is.

Used before loading (will the weights fit?), by `xllama bench` and by the scripts in benchmarks/.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def available_bytes(device: torch.device) -> int:
    """Memory that new tensors on `device` can still take."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62  # unknown: let the allocator decide
    try:  # a container's own limit, where there is one
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def total_memory() -> int | None:
    """The machine's physical memory in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation failure, on any device (each says it its own way)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        words in text for words in ("out of memory", "can't allocate memory", "not enough memory"))


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a measurement ran on, for the record written beside it."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_bytes": total_memory(), "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), where bfloat16 halves
    the bytes a decode step reads at no cost in arithmetic (elsewhere it is emulated)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, c)() for c in checks if hasattr(torch.cpu, c))
    except RuntimeError:
        return False


def last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache (32 MiB where the platform does not say)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError, IndexError):
            pass
    return max(sizes, default=32 << 20)


def cpu_jiffies() -> tuple[int, int, int]:
    """(all, busy, this process's and its waited-for children's) CPU time in clock ticks, from
    /proc; zeros where the platform has none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return 0, 0, 0
    own = sum(int(v) for v in mine[11:15])  # utime, stime, cutime, cstime
    return sum(fields), sum(fields) - fields[3] - fields[4], own  # idle and iowait are not busy


class OtherWork:
    """The share of the machine's CPU time that other processes take from now until `share()`:
    what a measurement competed with (None where the platform does not say, or the time was too
    short to tell)."""

    # /proc counts whole clock ticks, each CPU's and this process's rounded its own way: over a
    # few ticks a quiet machine reads as busy (1 tick of 2: 50%). Over MIN_TICKS a CPU (0.2 s at
    # Linux's usual 100 a second), a tick each way is a few percent.
    MIN_TICKS = 20

    def __init__(self) -> None:
        self.before = cpu_jiffies()

    def share(self) -> float | None:
        after = cpu_jiffies()
        total = after[0] - self.before[0]
        if total < self.MIN_TICKS * (os.cpu_count() or 1):
            return None
        busy, own = after[1] - self.before[1], after[2] - self.before[2]
        return max(0.0, busy - own) / total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int, copies: int = 10) -> float:
    """Memory bandwidth in GB/s: a large tensor copy, counting the bytes read and written."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)  # written once, so its pages exist
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (and first touch of dst)
    times = []
    for _ in range(copies):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9


def bandwidth_probe_bytes(device: torch.device) -> int:
    """Far larger than any cache (a GPU's L2 is tens of MB), and at most a quarter of free
    memory."""
    want = (1 << 30) if device.type == "cuda" else (256 << 20)
    return max(16 << 20, min(want, available_bytes(device) // 4))
