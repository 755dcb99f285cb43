"""`xllama convert`: write a checkpoint (HF or Meta) as an HF folder, optionally with fewer or more
K/V heads (mean-pooled per group, the GQA paper's conversion), another dtype or other shard sizes.

Tensors stream from the source one at a time (`Checkpoint.tensors()`, memory-mapped) into output
shards that are written as soon as they fill, so peak memory is about one source shard plus one
output shard. Everything goes to a temporary folder that is renamed to the destination at the end.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__, report
from .checkpoint import Checkpoint, open_checkpoint
from .config import ModelConfig
from .errors import XllamaError
from .layout import METHODS
from .loading import DTYPES, target_config
from .tensors import checked_tensors
from .writer import HashedFiles, ShardWriter, atomic_dir, check_destination, parse_size

if TYPE_CHECKING:
    from .model import Transformer

DEFAULT_SHARD_SIZE = "5GB"
# files that travel with the weights when present in an HF source folder
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
RECORD = "xllama_convert.json"


@dataclass
class ConvertResult:
    out: Path
    source: Path
    source_format: str
    kv_heads_before: int
    kv_heads_after: int
    method: str | None  # None when no K/V head was pooled
    dtype: str | None  # None: each tensor kept its source dtype
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    shards: list[str] = field(default_factory=list)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_out_dtype(dtype: str | None) -> torch.dtype | None:
    """--dtype of a written checkpoint: None keeps each tensor's source dtype."""
    if dtype in (None, "", "source"):
        return None
    if dtype not in DTYPES:
        raise XllamaError(f"unknown --dtype {dtype!r}; choose {', '.join(DTYPES)} (default: the "
                          "source's)")
    return DTYPES[dtype]


def hf_config(ckpt: Checkpoint, cfg: ModelConfig, dtype: torch.dtype | None,
              written: torch.dtype | None) -> dict:
    """config.json of the result: an HF source's own keys with only num_key_value_heads (and the
    dtype, when --dtype) changed; a Meta source's config in HF terms."""
    if ckpt.format == "hf":
        out = json.loads((ckpt.path / "config.json").read_text())
        out["num_key_value_heads"] = cfg.n_kv_heads
        if dtype is not None:
            keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
            for k in keys:
                out[k] = _dtype_name(dtype)
        return out
    out = cfg.to_hf()
    if written is not None:
        out["torch_dtype"] = _dtype_name(written)
    return out


def convert_checkpoint(src: str | Path | Checkpoint, out: str | Path, *, attn: str | None = None,
                       groups: int | None = None, method: str = "mean", seed: int | None = None,
                       dtype: str | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE,
                       force: bool = False, progress: bool = True) -> ConvertResult:
    """Convert the checkpoint `src` (a folder, or one already opened) into an HF folder `out`; see
    the module docstring.

    attn/groups: the K/V layout, as for `generate` (None: keep the source's). method: how a group's
    heads become one (mean | first | random; random draws from `seed`). dtype: float32 | bfloat16 |
    float16 (None: each tensor's source dtype). progress: a progress bar on stderr.
    """
    if method not in METHODS:
        raise XllamaError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    max_bytes = parse_size(shard_size)
    out_dtype = resolve_out_dtype(dtype)
    ckpt = open_checkpoint(src)
    out = check_destination(Path(out).expanduser(), force=force, sources=ckpt.sources)
    cfg = target_config(ckpt, attn, groups)
    src_kv, dst_kv = ckpt.config.n_kv_heads, cfg.n_kv_heads
    if method == "random" and seed is None:
        seed = secrets.randbelow(2**31)  # recorded, so the result can be made again
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    pooled = dst_kv < src_kv
    result = ConvertResult(out=out, source=ckpt.path.resolve(), source_format=ckpt.format,
                           kv_heads_before=src_kv, kv_heads_after=dst_kv,
                           method=method if pooled else None,
                           dtype=_dtype_name(out_dtype) if out_dtype is not None else None)
    total = sum(f.stat().st_size for f in ckpt.weight_files)

    with atomic_dir(out, force) as tmp:
        files = HashedFiles(tmp)
        shards = ShardWriter(files, max_bytes)
        written_dtype = None
        with report.progress(total, f"converting {ckpt.path.name}", unit="bytes",
                             enabled=progress) as advance:
            for name, t in checked_tensors(ckpt, cfg, method=method, generator=generator,
                                           dtype=out_dtype, on_read=advance):
                if out_dtype is not None:
                    t = t.to(out_dtype)
                written_dtype = written_dtype or t.dtype
                shards.add(name, t)
            result.shards = shards.close()
        files.write_json("config.json", hf_config(ckpt, cfg, out_dtype, written_dtype))
        _copy_tokenizer(ckpt, files)
        result.files = dict(files.sha256)
        record = {
            "xllama_version": __version__,
            "source": str(result.source),
            "source_format": ckpt.format,
            "method": result.method,
            "seed": seed if pooled and method == "random" else None,
            "kv_heads_before": src_kv,
            "kv_heads_after": dst_kv,
            "query_heads": cfg.n_heads,
            "dtype": result.dtype or _dtype_name(written_dtype),
            "shard_size": max_bytes,
            "sha256": result.files,
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return result


def _copy_tokenizer(ckpt: Checkpoint, files: HashedFiles) -> None:
    if ckpt.format == "hf":
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).is_file():
                files.copy(ckpt.path / name)
    tok = ckpt.tokenizer_path  # a Meta download keeps tokenizer.model in the parent folder
    if tok is not None and "tokenizer.model" not in files.sha256:
        files.copy(tok, "tokenizer.model")


def save_model(model: Transformer, source: Checkpoint, out: str | Path, record: dict, *,
               force: bool = False, dtype: torch.dtype | None = None) -> list[str]:
    """Write a loaded (e.g. uptrained) model as an HF folder, atomically, with `source`'s config
    keys and tokenizer files; `record` goes into xllama_convert.json with the files' sha256."""
    cfg = model.config
    with atomic_dir(out, force) as tmp:
        files = HashedFiles(tmp)
        shards = ShardWriter(files, parse_size(DEFAULT_SHARD_SIZE))
        written = None
        for name, t in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            t = t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
            written = written or t.dtype
            shards.add(name, t)
        names = shards.close()
        files.write_json("config.json", hf_config(source, cfg, written, written))
        _copy_tokenizer(source, files)
        record = {"xllama_version": __version__, "source": str(source.path.resolve()), **record,
                  "sha256": dict(files.sha256)}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return names
