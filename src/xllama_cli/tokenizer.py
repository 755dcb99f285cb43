"""SentencePiece tokenizer with BOS handling and streaming decode."""

from __future__ import annotations

import codecs
from pathlib import Path

from .errors import XllamaError


class Tokenizer:
    def __init__(self, path: str | Path, bos_id: int | None = None, eos_ids: list[int] | None = None) -> None:
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise XllamaError(f"tokenizer file {str(path)!r} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise XllamaError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        self.bos_id = self.sp.bos_id() if bos_id is None else bos_id
        self.eos_ids = eos_ids if eos_ids else [self.sp.eos_id()]
        self.eos_id = self.eos_ids[0]
        self.vocab_size = self.sp.GetPieceSize()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        if bos and self.bos_id is not None and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([i for i in ids if i not in (self.bos_id, *self.eos_ids) and 0 <= i < self.vocab_size])

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, leading space included (what DecodeIds strips at the start).
        An id past the tokenizer's pieces (a model's vocabulary padded beyond it) stands for none."""
        if not 0 <= token_id < self.vocab_size:
            return b""
        if self.sp.IsByte(token_id):
            return bytes([int(self.sp.IdToPiece(token_id)[1:-1], 16)])  # "<0xE2>"
        if self.sp.IsControl(token_id) or self.sp.IsUnknown(token_id):
            return b""
        return self.sp.IdToPiece(token_id).replace("\u2581", " ").encode("utf-8")

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens into text as they arrive: byte-fallback pieces of one character are held back
    until the character is complete; spaces are kept as they are."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.tokenizer.piece_bytes(token_id))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder (its tokenizer.model, or the parent's), or a .model file."""
    from .checkpoint import open_checkpoint

    path = Path(path).expanduser()
    if path.is_file():
        return Tokenizer(path)
    ckpt = open_checkpoint(path)
    tok_path = ckpt.tokenizer_path
    if tok_path is None:
        raise XllamaError(f"no tokenizer.model in {str(path)!r} or its parent folder")
    cfg = ckpt.config
    return Tokenizer(tok_path, bos_id=cfg.bos_id, eos_ids=cfg.eos_id)
