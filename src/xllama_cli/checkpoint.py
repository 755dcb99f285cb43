"""Reading checkpoint folders (Hugging Face or Meta) as a ModelConfig and a stream of tensors.

Tensors are yielded one at a time, under HF's parameter names and in HF's half-split RoPE
order, straight from memory-mapped files: a checkpoint is never held twice in memory.
Under tensor parallelism a rank asks for ranges of some tensors (`tensors(select)`) and only
those bytes are read: safetensors slicing, or the overlapping Meta shards' memory-mapped pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import mmap
import pickle
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import ModelConfig, read_json, show_json
from .errors import XllamaError

# (dim, start, stop): rows (dim 0) or columns (dim 1) of a tensor, in HF layout
Part = tuple[int, int, int]
Select = Callable[[str], "Part | None"]


@dataclass
class Checkpoint:
    path: Path
    format: str  # "hf" | "meta"
    config: ModelConfig
    weight_files: list[Path]

    @property
    def tokenizer_path(self) -> Path | None:
        for p in (self.path / "tokenizer.model", self.path.parent / "tokenizer.model"):
            if p.is_file():
                return p
        return None

    @property
    def sources(self) -> list[Path]:
        """The folder and every file this checkpoint is read from: what no output may replace."""
        tokenizer = self.tokenizer_path
        return [self.path, *self.weight_files, *([tokenizer] if tokenizer else [])]

    def tensors(self, select: Select | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) pairs in the checkpoint's own K/V layout and dtype.

        select(HF name) -> Part or None: read only that range of the tensor (None: all of it).
        """
        return _hf_tensors(self, select) if self.format == "hf" else _meta_tensors(self, select)


def open_checkpoint(path: str | Path | Checkpoint) -> Checkpoint:
    """A checkpoint folder (a repo id is resolved to its folder above it: download.resolve_model);
    a Checkpoint already opened is returned as it is, so a command opens its checkpoint once."""
    if isinstance(path, Checkpoint):
        return path
    path = Path(path).expanduser()
    if not path.exists():
        raise XllamaError(f"model folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise XllamaError(f"{str(path)!r} is not a folder; pass the folder that holds config.json "
                          "or params.json")
    if (path / "config.json").is_file():
        return _open_hf(path)
    if (path / "params.json").is_file():
        return _open_meta(path)
    raise XllamaError(f"{str(path)!r} holds no checkpoint: neither config.json (Hugging Face) nor "
                      "params.json (Meta)")


def _checked(ckpt: Checkpoint, config_name: str) -> Checkpoint:
    """`ckpt`, once its config is seen to be possible for its weight files: each parameter takes
    at least a byte, so a config that describes more parameters than the files have bytes is
    refused here, before a model of its size is built or given memory. (A smaller mismatch is
    found tensor by tensor while loading, with the tensor's name.)"""
    # a file that cannot be read is that file's error, whatever the config says
    for f in ckpt.weight_files:
        if f.suffix == ".safetensors":
            _safetensors_header(f)
        else:  # memory-mapped: only the pickled index of tensors is read
            _torch_load(f)
    n = ckpt.config.n_params()
    held = sum(f.stat().st_size for f in ckpt.weight_files)
    if n > held:
        raise XllamaError(f"{ckpt.path / config_name} describes a model of {n:,} parameters, more "
                          f"than its weight files' {held:,} bytes can hold; config and weights do "
                          "not match")
    return ckpt


def _safetensors_header(f: Path) -> None:
    """A safetensors file's header and length, checked without mapping the file (a mapping larger
    than the machine's memory fails, and that is for the memory check to say)."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError,
            AttributeError) as e:
        raise XllamaError(f"{f} is corrupt or truncated (its header: {str(e).splitlines()[0]}); "
                          "download it again") from None
    if 8 + n + end != size:
        raise XllamaError(f"{f} is corrupt or truncated (its header describes {8 + n + end:,} "
                          f"bytes, the file has {size:,}); download it again")


@contextlib.contextmanager
def _reading(f: Path) -> Iterator[None]:
    """Reading a safetensors file: its failures as one error that says what to do."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, RuntimeError) as e:
        raise XllamaError(f"{f} is corrupt or truncated ({str(e).splitlines()[0]}); download it "
                          "again") from None


# ---- Hugging Face ----
def _open_hf(path: Path) -> Checkpoint:
    cfg = ModelConfig.from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            files = [path / s for s in _index_shards(index)]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise XllamaError(f"{index} names shards that are missing: {', '.join(missing)}")
            return _checked(Checkpoint(path, "hf", cfg, files), "config.json")
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise XllamaError(f"{path} has config.json but no weights (model.safetensors or "
                          "pytorch_model.bin)")
    return _checked(Checkpoint(path, "hf", cfg, files), "config.json")


def _index_shards(index: Path) -> list[str]:
    """The shard files an index names: plain relative paths inside the checkpoint folder."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise XllamaError(f"{index}: weight_map must be a non-empty object of tensor name -> shard "
                          f"file, got {show_json(weight_map)}")
    shards = sorted({s for s in weight_map.values() if isinstance(s, str)})
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _inside(shard):
            raise XllamaError(f"{index}: weight_map[{show_json(name)}] must name a shard file "
                              f"inside the folder (a relative path without '..'), got "
                              f"{show_json(shard)}")
    return shards


def _inside(name: str) -> bool:
    """Whether a relative file name stays inside its folder, on any platform (names, not links,
    are checked: a hub cache's shards are links to files elsewhere)."""
    parts = re.split(r"[\\/]", name)
    return (bool(name) and not re.match(r"^([\\/]|[A-Za-z]:)", name) and ".." not in parts
            and parts[-1] not in ("", "."))


def _hf_tensors(ckpt: Checkpoint, select: Select | None) -> Iterator[tuple[str, torch.Tensor]]:
    for f in ckpt.weight_files:
        if f.suffix == ".safetensors":
            yield from _safetensors_file(f, select)
        else:
            for name, t in _torch_load(f).items():
                part = select(name) if select else None
                yield name, t if part is None else _narrow(t, part)


def _safetensors_file(f: Path, select: Select | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with _reading(f):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            names = list(sf.keys())
        for name in names:
            # one mapping per tensor: the pages read of a tensor that is then copied (converted to
            # another dtype, packed for oneDNN, or a rank's part of it) leave the resident memory
            # with the tensor, instead of adding up over the file beside the copies
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                part = select(name) if select else None
                if part is None:
                    yield name, sf.get_tensor(name)
                else:  # a view of the memory-mapped file: only the range's pages are read
                    dim, start, stop = part
                    yield name, sf.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]


def release_pages(t: torch.Tensor) -> None:
    """Let resident memory drop the pages of `t`, a tensor memory-mapped from a checkpoint file that
    was copied (converted, packed, a rank's part) and is about to be dropped. A .bin or .pth file
    is one mapping that lives as long as any of its tensors, so without this every page read stays
    resident beside the copies. The pages stay in the page cache and the mapping stays valid
    (touching them reads the file again); memory that is not a file's mapping is left alone."""
    if (t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous()
            or sys.platform != "linux"):
        return
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if hi > lo and _file_mapped(lo, hi):
        _madvise()(lo, hi - lo, 4)  # MADV_DONTNEED


def return_free_heap() -> None:
    """Hand the pages the C heap holds free back to the system (glibc's malloc_trim). Packing a
    matrix frees the copy it packed from, and such holes between the packed weights still held
    stay resident otherwise (how many varies from run to run with where each copy fell)."""
    if sys.platform == "linux":
        trim = getattr(_libc(), "malloc_trim", None)  # glibc only (not musl)
        if trim is not None:
            trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _madvise() -> Callable[[int, int, int], int]:
    madvise = _libc().madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def _file_mapped(lo: int, hi: int) -> bool:
    """Whether [lo, hi) lies inside one mapping of a file (not anonymous memory, whose pages
    MADV_DONTNEED would zero)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                a, b = (int(x, 16) for x in fields[0].split("-"))
                if a <= lo and hi <= b:
                    return len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/")
    except OSError:
        pass
    return False


def _narrow(t: torch.Tensor, part: Part) -> torch.Tensor:
    dim, start, stop = part
    return t.narrow(dim, start, stop - start)  # a view: nothing is read until it is used


def _torch_load(f: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: the file's pages are read on demand, not copied; weights_only: no pickled code runs
        return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        raise XllamaError(f"refusing {f}: it holds pickled objects other than tensors, which are "
                          "never loaded (weights_only=True); convert it to safetensors from a "
                          "trusted copy") from None
    except Exception as e:  # torch raises many types for a bad file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise XllamaError(f"cannot read {f}: {why}") from None


# ---- Meta (consolidated.NN.pth) ----
_META_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_META_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# model-parallel split dimension of each Meta tensor kind (None: replicated)
_META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
               "wo": 1, "w2": 1, "tok_embeddings": 1}


def _meta_name(name: str) -> str | None:
    if name in _META_NAMES:
        return _META_NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _META_LAYER:
        return f"model.layers.{m.group(1)}.{_META_LAYER[m.group(2)]}"
    return None  # rope.freqs and the like: derived, not loaded


def _split_dim(name: str, shard: torch.Tensor, dim: int) -> int | None:
    """The dimension a Meta tensor is split along over model-parallel shards. The embedding is the
    one that differs by release: Llama 1/2 split it over the model dimension (ParallelEmbedding),
    Llama 3 over the vocabulary (VocabParallelEmbedding); a shard's width tells which."""
    kind = name.split(".")[-2]
    if kind == "tok_embeddings" and shard.shape[-1] == dim:
        return 0
    return _META_SPLIT.get(kind)


def _open_meta(path: Path) -> Checkpoint:
    params = read_json(path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise XllamaError(f"{path} has params.json but no consolidated.NN.pth weights")
    first = _torch_load(files[0])
    try:
        embedding = first["tok_embeddings.weight"]
        by_rows = len(files) > 1 and _split_dim("tok_embeddings.weight", embedding,
                                                params.get("dim")) == 0
        vocab = embedding.shape[0] * (len(files) if by_rows else 1)
        hidden = first["layers.0.feed_forward.w1.weight"].shape[0] * len(files)
    except KeyError as e:
        raise XllamaError(f"{files[0]} lacks {e.args[0]!r}: not a Meta Llama checkpoint") from None
    except (TypeError, AttributeError, IndexError):  # not a dict of tensors
        raise XllamaError(f"{files[0]} does not hold a Meta Llama checkpoint's tensors") from None
    cfg = ModelConfig.from_meta(params, vocab_size=vocab, hidden_dim=hidden,
                                source=str(path / "params.json"))
    cfg.tie_embeddings = _tied_head(first, len(files), release_ties=cfg.tie_embeddings)
    return _checked(Checkpoint(path, "meta", cfg, files), "params.json")


def _tied_head(first: dict[str, torch.Tensor], n_files: int, release_ties: bool) -> bool:
    """Whether a Meta checkpoint's head is its embedding: no output.weight, or (for a release that
    ties them, Llama 3.2 1B/3B, whose files hold both) an output.weight that is the embedding's
    own storage or equal to it. Only then are the values compared: the two tensors are the
    largest of the file."""
    if "output.weight" not in first:
        return True
    if not release_ties or n_files > 1:
        return False
    head, embedding = first["output.weight"], first["tok_embeddings.weight"]
    if head.shape != embedding.shape or head.dtype != embedding.dtype:
        return False
    same = (head.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()
            and head.storage_offset() == embedding.storage_offset()
            and head.stride() == embedding.stride())
    return same or torch.equal(head, embedding)


def _meta_tensors(ckpt: Checkpoint, select: Select | None) -> Iterator[tuple[str, torch.Tensor]]:
    head_dim = ckpt.config.head_dim
    shards = [_torch_load(f) for f in ckpt.weight_files]  # memory-mapped: nothing read yet
    for name in shards[0]:
        hf_name = _meta_name(name)
        if hf_name is None:
            continue
        part = select(hf_name) if select else None
        t = _meta_merged(shards, name, _split_dim(name, shards[0][name], ckpt.config.dim), part)
        qk = name.endswith(("attention.wq.weight", "attention.wk.weight"))
        if qk and t.shape[0] % head_dim == 0:
            # per head, so a range of whole heads unpermutes on its own (a bad shape fails the
            # caller's check)
            t = _unpermute(t, t.shape[0] // head_dim, head_dim)
        yield hf_name, t


def _meta_merged(shards: list[dict[str, torch.Tensor]], name: str, split: int | None,
                 part: Part | None) -> torch.Tensor:
    """Tensor `name` of the merged model-parallel shards, or only `part` of it.

    A range along the shards' own split dimension touches only the shards it overlaps: when the
    world size equals the shard count, each rank reads its own consolidated.NN.pth.
    """
    if part is None:
        if len(shards) == 1 or split is None:
            return shards[0][name]
        return torch.cat([s[name] for s in shards], dim=split)
    dim, start, stop = part
    if len(shards) == 1 or split is None:
        return _narrow(shards[0][name], part)
    if dim != split:
        return torch.cat([_narrow(s[name], part) for s in shards], dim=split)
    pieces, offset = [], 0
    for s in shards:
        n = s[name].shape[dim]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            pieces.append(_narrow(s[name], (dim, lo - offset, hi - offset)))
        offset += n
    if not pieces:  # past the end: an empty tensor, which the caller's shape check reports
        return _narrow(shards[0][name], (dim, 0, 0))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _unpermute(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Meta's interleaved-pair RoPE rows -> HF's half-split rows, per head."""
    dim = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)
