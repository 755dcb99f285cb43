"""The CPU kernels measured on this machine (linear.Tuner's times), kept between loads in the
user's cache folder, so that only the first load of a model's shapes pays for the measuring.

One JSON file per machine: the CPU (model, flags, count) and torch's version hashed into its name,
and written out in full inside it. A file that cannot be read, is not what this module writes, or
describes another machine (copied from one, or written by another torch) is ignored and replaced
at the next save; an entry whose times are not numbers is measured again. Writes are atomic
(a temporary file, then a rename), so processes that load at once never read half a file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import XllamaError
from .machine import cpu_flags, cpu_name
from .writer import atomic_write

# 2: numba's product among the candidates; 3: int4's widened many-row product, and the many-row
# side timed at 128 rows; 4: the VNNI forms of int4 and int8 weights (vnni.py) and the bf16 loop
# (gemv.py). A new candidate needs a new version: kept times are reused as they are, and would
# never meet it
VERSION = 4


def cache_folder() -> Path:
    """xllama's folder in the user's cache: $XDG_CACHE_HOME/xllama (default ~/.cache/xllama),
    ~/Library/Caches/xllama on macOS, %LOCALAPPDATA%\\xllama\\cache on Windows."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "xllama" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "xllama"
    base = os.environ.get("XDG_CACHE_HOME") or ""
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "xllama"


def machine() -> dict[str, Any]:
    """What a kernel's speed depends on besides its shape: the CPU and torch's build."""
    flags = " ".join(sorted(cpu_flags()))
    return {"cpu": cpu_name(), "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
            "cpu_count": os.cpu_count(), "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "numba": _version("numba")}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class KernelCache:
    """linear.Store over this machine's file in `folder` (default: cache_folder())."""

    def __init__(self, folder: Path | None = None) -> None:
        self.machine = machine()
        digest = hashlib.sha256(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()
        self.path = (folder or cache_folder()) / f"kernels-{digest[:16]}.json"
        self.entries = self._read()
        self.changed = False

    def _read(self) -> dict[str, dict]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, unreadable or corrupt: measured again
        if (not isinstance(doc, dict) or doc.get("version") != VERSION
                or doc.get("machine") != self.machine or not isinstance(doc.get("entries"), dict)):
            return {}  # another format, or another CPU's or torch's choices
        return doc["entries"]

    def get(self, key: str) -> dict | None:
        entry = self.entries.get(key)
        return entry if _valid(entry) else None

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        self.changed = True

    def save(self) -> bool:
        """Write the entries if any changed; False where the folder cannot be written (the
        choices then last for this process only)."""
        if not self.changed:
            return True
        doc = {"version": VERSION, "machine": self.machine, "entries": self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))
        except (OSError, XllamaError):
            return False
        self.changed = False
        return True


def _valid(entry: Any) -> bool:
    """An entry as linear.Tuner writes it: {"times": {layout: {side: {product: seconds}}}}."""
    if not isinstance(entry, dict) or not isinstance(entry.get("times"), dict):
        return False
    for sides in entry["times"].values():
        if not isinstance(sides, dict):
            return False
        for products in sides.values():
            if not isinstance(products, dict) or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                    and s >= 0 for s in products.values()):
                return False
    return True
