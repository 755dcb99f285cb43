"""Writing checkpoint folders safely: an atomic output folder and streamed safetensors shards.

`atomic_dir` gives a temporary folder next to the destination and renames it into place only
when everything is written, so an interrupted or failed run leaves no destination and no
half-written file. `ShardWriter` writes tensors into safetensors shards of bounded size as they
arrive (one shard in memory at a time) and hashes every byte it writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .errors import XllamaError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '2GiB', '1.5G', '1000' (bytes); decimal units as HF uses
    them."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.match(text)
        if not m:
            raise XllamaError(f"cannot read the size {text!r}; write it like 5GB, 500MB, 2GiB or a "
                              "byte count")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if size <= 0:
        raise XllamaError(f"the size {text!r} must be positive")
    return size


# ---- the one rule for what a command may write ----
def check_destination(out: str | Path, *, force: bool, sources: Iterable[str | Path] = (),
                      flag: str = "--out", kind: str = "folder") -> Path:
    """`out` as an absolute path, if a command may write there; else one error line saying why.

    Checked before any work, by every command that writes (folders: convert, uptrain, download
    --out; files: bench --out/--plot): what exists is replaced only with `force`; never a source
    (a checkpoint the command reads, its files as linked, e.g. in the Hugging Face cache), a folder
    holding one, a path inside one, nor the working folder or a folder holding it, even with
    `force`.
    """
    out = Path(out).expanduser().absolute()
    real = out.resolve()
    for src in sources:
        src = Path(src).expanduser().resolve()
        if real == src or real in src.parents or src in real.parents:
            raise XllamaError(f"{flag} {out} would replace the source {src} (or a folder holding "
                              "it); choose a folder outside it")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise XllamaError(f"{flag} {out} is the working folder or holds it; choose a new folder")
    if kind == "file":
        if out.is_dir():
            raise XllamaError(f"{flag} {out} is a folder; name a file")
        if not out.parent.is_dir():
            raise XllamaError(f"{flag} {out}: folder {out.parent} does not exist")
    elif out.exists() and not out.is_dir() and not force:
        raise XllamaError(f"{flag} {out} is a file; choose a folder (or pass --force to replace "
                          "it)")
    if kind != "merge" and (out.exists() or out.is_symlink()) and not force:
        raise XllamaError(f"{out} already exists; choose another {flag} or pass --force to "
                          "replace it")
    return out


# ---- the atomic output folder ----
def _temp_prefix(dst: Path) -> str:
    return f".{dst.name}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_stale_temps(dst: Path) -> None:
    """Temp folders left by a run that was killed outright (SIGKILL, power loss): their process
    is gone."""
    prefix = _temp_prefix(dst)
    for p in dst.parent.glob(prefix + "*"):
        pid = p.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(p)


class _Terminated(SystemExit):
    """SIGTERM turned into an exception so that the temporary folder is removed on the way out."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `dst`; on success it becomes `dst`.

    `dst` must not exist unless `force` (then it is replaced only once the new folder is complete).
    On any exception, Ctrl-C or SIGTERM the temporary folder is removed and `dst` is untouched.
    OSError (disk full, permissions) becomes an XllamaError.
    """
    dst = Path(dst).expanduser().absolute()
    if (dst.exists() or dst.is_symlink()) and not force:
        raise XllamaError(f"{dst} already exists; choose another --out or pass --force to "
                          "replace it")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(dst)
        tmp = dst.parent / f"{_temp_prefix(dst)}{os.getpid()}-{secrets.token_hex(3)}"
        tmp.mkdir()
    except OSError as e:
        raise XllamaError(f"cannot create {dst}: {e.strerror or e}") from None
    try:
        with _sigterm_raises():
            yield tmp
            if (dst.exists() or dst.is_symlink()) and not force:
                raise XllamaError(f"{dst} appeared while this run was writing; nothing was "
                                  "replaced (pass --force to replace it)")
            if dst.exists() or dst.is_symlink():
                old = dst.parent / f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
                os.replace(dst, old)  # the old folder goes only once the new one is complete
                os.replace(tmp, dst)
                _remove(old)
            else:
                os.replace(tmp, dst)
    except OSError as e:
        _remove(tmp)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise XllamaError(f"writing {dst} failed: {e.strerror or e}{where}; nothing was "
                          "written") from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file in the destination folder, then rename: never a
    half-written file."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise XllamaError(f"cannot write {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


# ---- files with their sha256 ----
class HashedFiles:
    """The files written into a folder and the sha256 of each, computed from the bytes as
    written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sha256: dict[str, str] = {}

    def write_bytes(self, name: str, data: bytes) -> None:
        (self.folder / name).write_bytes(data)
        self.sha256[name] = hashlib.sha256(data).hexdigest()

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2) + "\n").encode())

    def copy(self, src: Path, name: str | None = None) -> None:
        name = name or src.name
        h = hashlib.sha256()
        with open(src, "rb") as fin, open(self.folder / name, "wb") as fout:
            while chunk := fin.read(1 << 20):
                h.update(chunk)
                fout.write(chunk)
        self.sha256[name] = h.hexdigest()


# ---- safetensors ----
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file tensor by tensor (no second copy of the whole shard); returns its
    sha256."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise XllamaError(f"cannot store {name} of dtype {t.dtype} in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    # the data starts 8-byte aligned, as the safetensors library writes it
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(head)), head):
            h.update(chunk)
            f.write(chunk)
        for t in tensors.values():
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            h.update(data)
            f.write(data)
    return h.hexdigest()


class ShardWriter:
    """Collects tensors into shards of at most `max_bytes` (a bigger tensor gets a shard of its own)
    and writes each shard as soon as it is full, so one shard at most is held in memory.

    `close()` names the shards as Hugging Face does (`model.safetensors`, or
    `model-00001-of-00003.safetensors` with `model.safetensors.index.json`).
    """

    def __init__(self, files: HashedFiles, max_bytes: int) -> None:
        self.files, self.max_bytes = files, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str], str]] = []  # (temporary name, tensor names, sha256)
        self.total_bytes = 0
        self.seen: set[str] = set()

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.seen:
            raise XllamaError(f"tensor {name!r} appears twice in the checkpoint")
        self.seen.add(name)
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += n
        self.total_bytes += n

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.shards) + 1:05d}.safetensors.partial"
        sha = write_safetensors(self.files.folder / name, self.pending)
        self.shards.append((name, list(self.pending), sha))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left, give the shards their final names and write the index; returns the
        names."""
        self.flush()
        if not self.shards:
            raise XllamaError("the checkpoint holds no tensors")
        n = len(self.shards)
        finals = (["model.safetensors"] if n == 1
                  else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)])
        weight_map: dict[str, str] = {}
        for (tmp, names, sha), final in zip(self.shards, finals):
            os.replace(self.files.folder / tmp, self.files.folder / final)
            self.files.sha256[final] = sha
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            self.files.write_json("model.safetensors.index.json", index)
        return finals
