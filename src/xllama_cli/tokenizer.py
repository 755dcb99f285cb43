"""Tokenizers by file kind (SentencePiece `tokenizer.model`, Hugging Face `tokenizer.json`, Meta's
tiktoken `tokenizer.model`), their special tokens read from the checkpoint's files, and streaming
decode that keeps spaces and multi-byte characters.

Text is always encoded as ordinary text: a special token spelled in a prompt or a message stays
text, never its id. Only a chat template's own markup becomes special ids (`encode_chat`)."""

from __future__ import annotations

import base64
import codecs
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from .config import read_json
from .errors import XllamaError

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

# ---- special tokens: what the checkpoint's files say ----
# Files read for special tokens, highest authority first (config.json last: older checkpoints keep
# their ids only there).
SPECIAL_SOURCES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "config.json")
ROLES = ("bos", "eos", "pad", "unk")


@dataclass
class Specials:
    """What the checkpoint's files say of the special tokens, highest authority first per role.
    Each entry of `named[role]` is a token's text (str), an id (int), or None (explicitly none)."""

    named: dict[str, list[str | int | None]] = field(default_factory=lambda: {r: [] for r in ROLES})
    added: dict[int, tuple[str, bool]] = field(default_factory=dict)  # id -> (text, special)
    add_bos: bool = True


def _token_text(value: object) -> str | None:
    """A token as tokenizer_config.json writes it: a str, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_specials(folder: Path) -> Specials:
    out = Specials()
    for name in SPECIAL_SOURCES:
        path = folder / name
        if not path.is_file():
            continue
        data = read_json(path)
        by_text = name in ("tokenizer_config.json", "special_tokens_map.json")
        for role in ROLES:
            key = f"{role}_token" if by_text else f"{role}_token_id"
            if key not in data:
                continue
            value = data[key]
            if by_text:
                out.named[role].append(_token_text(value))
            elif isinstance(value, list):
                out.named[role].extend(v for v in value if isinstance(v, int))
            else:
                out.named[role].append(value if isinstance(value, int) else None)
        if name == "tokenizer_config.json":
            out.add_bos = data.get("add_bos_token") is not False
            for key, tok in (data.get("added_tokens_decoder") or {}).items():
                text = _token_text(tok)
                if text is not None and str(key).isdigit():
                    special = bool(isinstance(tok, dict) and tok.get("special", True))
                    out.added[int(key)] = (text, special)
        if name == "special_tokens_map.json":
            for tok in data.get("additional_special_tokens") or []:
                text = _token_text(tok)
                if text is not None:
                    out.named.setdefault("additional", []).append(text)
    return out


# ---- the interface ----
class Tokenizer(ABC):
    """Text <-> ids for one checkpoint. Implementations differ in the file they read; what the rest
    of xllama sees is this: encode, decode, stream, encode_chat, and the special ids."""

    kind: ClassVar[str]
    path: Path
    vocab_size: int  # ids the tokenizer can decode, added tokens included
    bos_id: int | None
    eos_ids: list[int]  # generation stops at any of them; the first is the EOS that encode appends
    pad_id: int | None
    added: dict[str, int]  # every added or special token's text -> id
    special_ids: frozenset[int]  # ids that stand for no text (decode and stream drop them)
    special_text: dict[str, str]  # bos_token, eos_token, ... as a chat template reads them
    add_bos: bool

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    # -- what each kind provides --
    @abstractmethod
    def _ordinary(self, text: str) -> list[int]:
        """Ids of text in which special-token spellings are plain text."""

    @abstractmethod
    def _with_special(self, text: str) -> list[int]:
        """Ids of template markup: added-token spellings become their ids."""

    @abstractmethod
    def _plain(self, text: str) -> list[int]:
        """Ids of text with no added token matched at all."""

    @abstractmethod
    def token_text(self, token_id: int) -> str | None:
        """The token's own string (a vocabulary piece or an added token), None past the
        vocabulary."""

    @abstractmethod
    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, a leading space included; none for special tokens and
        ids past the tokenizer's pieces (a model's vocabulary may be padded beyond it)."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ids that are all in the vocabulary and not special."""

    # -- shared --
    def token_id(self, text: str) -> int | None:
        return self.added.get(text)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._ordinary(text)
        if bos and self.add_bos and self.bos_id is not None and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_chat(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """Ids of a rendered chat cut into pieces: (text, as_text). Pieces with as_text False are
        the template's output (markup: its added-token spellings become ids); as_text True marks a
        control token a user wrote, which stays text. A piece after the first continues the text,
        so a SentencePiece-style tokenizer must not add its start-of-text space to it."""
        ids: list[int] = []
        newline = self._plain("\n")
        for i, (piece, as_text) in enumerate(pieces):
            encode = self._plain if as_text else self._with_special
            if i == 0:
                ids += encode(piece)
            elif piece:
                # encode after a newline and drop it: no prefix space, and the same split
                # transformers makes
                after = encode("\n" + piece)
                ids += after[len(newline):] if after[:len(newline)] == newline else encode(piece)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._decode([i for i in ids
                             if 0 <= i < self.vocab_size and i not in self.special_ids])

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def control_tokens(self, also: Callable[[str], bool] = lambda _text: False) -> list[str]:
        """The added tokens a user's text must not produce: the special ones, and those `also` picks
        (a chat template's own markup)."""
        return [t for t, i in self.added.items()
                if i in self.special_ids or (also(t) and not t.isspace())]

    # -- special tokens, from the files and the tokenizer itself --
    def _resolve(self, specials: Specials, own: dict[str, list[int]]) -> None:
        """bos/eos/pad from the checkpoint's files in order of authority, then the tokenizer's own.
        The most authoritative source that names a token decides, an explicit null (no BOS)
        included; EOS: every source's ids stop generation, the most authoritative one first."""
        def ids_of(role: str) -> list[int | None]:
            values = specials.named.get(role, [])
            named = [None if v is None else self._id_of(v) for v in values]
            # a name this tokenizer lacks says nothing; an explicit null says "none"
            named = [i for i, v in zip(named, values) if i is not None or v is None]
            return named + list(own.get(role, []))

        firsts = {role: (ids_of(role) or [None])[0] for role in ROLES}
        self.bos_id, self.pad_id = firsts["bos"], firsts["pad"]
        self.eos_ids = list(dict.fromkeys(i for i in ids_of("eos") if i is not None))
        self.add_bos = specials.add_bos
        self.special_text = {f"{role}_token": text for role, i in firsts.items()
                             if i is not None and (text := self.token_text(i)) is not None}
        named = {firsts["bos"], firsts["pad"], *self.eos_ids,
                 *(self._id_of(t) for t in specials.named.get("additional", []))}
        self.special_ids = frozenset(self.special_ids | (named - {None}))

    def _id_of(self, value: str | int) -> int | None:
        if isinstance(value, int):
            return value if 0 <= value < self.vocab_size else None
        return self.token_id(value)


class StreamDecoder:
    """Turns tokens into text as they arrive: the bytes of a character split over tokens (byte
    fallback, byte-level BPE) are held back until it is complete; spaces are kept as they are."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.tokenizer.piece_bytes(token_id))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def _split_on(text: str, tokens: dict[str, int]) -> list[str | int]:
    """text cut at the spellings of `tokens` (the longest first): text pieces and token ids."""
    if not tokens:
        return [text]
    pattern = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    out: list[str | int] = []
    pos = 0
    for m in re.finditer(pattern, text):
        out += [text[pos:m.start()], tokens[m.group()]]
        pos = m.end()
    return out + [text[pos:]]


# ---- SentencePiece ----
class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path, specials: Specials | None = None) -> None:
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise XllamaError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        self.vocab_size = self.sp.GetPieceSize()
        controls = [i for i in range(self.vocab_size)
                    if self.sp.IsControl(i) or self.sp.IsUnknown(i)]
        self.added = {self.sp.IdToPiece(i): i for i in controls}
        self.special_ids = frozenset(i for i in controls if self.sp.IsControl(i))
        specials = specials or Specials()
        # tokens a fine-tune added past the SentencePiece model, as tokenizer_config.json lists them
        self.extra = {i: t for i, (t, _) in specials.added.items() if i >= self.vocab_size}
        self.added.update({t: i for i, t in self.extra.items()})
        self.special_ids |= {i for i, (_, special) in specials.added.items() if special}
        if self.extra:
            self.vocab_size = max(self.extra) + 1
        own = {"bos": [self.sp.bos_id()], "eos": [self.sp.eos_id()], "pad": [self.sp.pad_id()],
               "unk": [self.sp.unk_id()]}
        self._resolve(specials, {k: [i for i in v if i >= 0] for k, v in own.items()})

    def _ordinary(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)  # SentencePiece never reads control pieces out of text

    _plain = _ordinary

    def _with_special(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _split_on(text, self.added):
            ids += [part] if isinstance(part, int) else (self.sp.EncodeAsIds(part) if part else [])
        return ids

    def token_id(self, text: str) -> int | None:
        if text in self.added:
            return self.added[text]
        i = self.sp.PieceToId(text)
        return i if self.sp.IdToPiece(i) == text else None

    def token_text(self, token_id: int) -> str | None:
        if token_id in self.extra:
            return self.extra[token_id]
        return self.sp.IdToPiece(token_id) if 0 <= token_id < self.sp.GetPieceSize() else None

    def piece_bytes(self, token_id: int) -> bytes:
        if token_id in self.extra:
            return b"" if token_id in self.special_ids else self.extra[token_id].encode("utf-8")
        if not 0 <= token_id < self.sp.GetPieceSize() or token_id in self.special_ids:
            return b""
        if self.sp.IsByte(token_id):
            return bytes([int(self.sp.IdToPiece(token_id)[1:-1], 16)])  # "<0xE2>"
        if self.sp.IsControl(token_id) or self.sp.IsUnknown(token_id):
            return b""
        return self.sp.IdToPiece(token_id).replace("\u2581", " ").encode("utf-8")

    def _decode(self, ids: list[int]) -> str:
        out, run = "", []
        for i in ids:  # added tokens are outside the SentencePiece model: their text as it is
            if i in self.extra:
                out, run = out + self.sp.DecodeIds(run) + self.extra[i], []
            else:
                run.append(i)
        return out + self.sp.DecodeIds(run)


# ---- tokenizer.json (Hugging Face tokenizers) ----
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _has_type(spec: object, name: str) -> bool:
    if isinstance(spec, dict):
        return spec.get("type") == name or any(_has_type(v, name) for v in spec.values())
    if isinstance(spec, list):
        return any(_has_type(v, name) for v in spec)
    return False


class TokenizersTokenizer(Tokenizer):
    kind = "tokenizer.json"

    def __init__(self, path: Path, specials: Specials | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
            spec = json.loads(text)
            self.tok = HFTokenizer.from_str(text)
        except Exception as e:  # OSError, bad UTF-8 or JSON, and the plain Exception of tokenizers
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise XllamaError(f"cannot read tokenizer {path}: {why}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        decoder = self.tok.get_added_tokens_decoder()
        self.added = {t.content: i for i, t in decoder.items()}
        self.special_ids = frozenset(i for i, t in decoder.items() if t.special)
        self.byte_level = _has_type(spec.get("decoder"), "ByteLevel")
        self.byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        self.bytes_of = _byte_decoder() if self.byte_level else {}
        self._resolve(specials or Specials(), {"bos": self._bos_of_post_processor(spec)})

    def _bos_of_post_processor(self, spec: dict) -> list[int]:
        """The special token the post-processor puts before a text, if any: the tokenizer's own
        BOS."""
        def find(node: object) -> list[int]:
            if isinstance(node, dict):
                if node.get("type") == "TemplateProcessing":
                    first = (node.get("single") or [{}])[0]
                    if "SpecialToken" in first:
                        i = self.tok.token_to_id(first["SpecialToken"]["id"])
                        return [i] if i is not None else []
                return [i for v in node.values() for i in find(v)]
            if isinstance(node, list):
                return [i for v in node for i in find(v)]
            return []
        return find(spec.get("post_processor"))[:1]

    def _encode(self, text: str, split_special: bool) -> list[int]:
        if self.tok.encode_special_tokens != split_special:
            self.tok.encode_special_tokens = split_special
        return self.tok.encode(text, add_special_tokens=False).ids

    def _ordinary(self, text: str) -> list[int]:
        return self._encode(text, split_special=True)

    def _with_special(self, text: str) -> list[int]:
        return self._encode(text, split_special=False)

    def _plain(self, text: str) -> list[int]:
        # the tokenizer's own pipeline without its added-token matching (as transformers does it)
        if self.tok.normalizer is not None:
            text = self.tok.normalizer.normalize_str(text)
        pre = self.tok.pre_tokenizer
        splits = [s for s, _ in pre.pre_tokenize_str(text)] if pre else [text]
        return [t.id for s in splits for t in self.tok.model.tokenize(s)]

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def token_text(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None

    def piece_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_ids:
            return b""
        piece = self.token_text(token_id)
        if piece is None:
            return b""
        if piece in self.added:  # added tokens are stored as their text
            return piece.encode("utf-8")
        if self.byte_level:
            return bytes(self.bytes_of[c] for c in piece)
        if self.byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


# ---- Meta's tiktoken tokenizer.model (Llama 3) ----
# Meta's llama3 tokenizer.py: the pre-tokenizer pattern and the special tokens after the ranks
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>"]
LLAMA3_N_SPECIALS = 256
LLAMA3_STOP = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except OSError as e:
        raise XllamaError(f"cannot read tokenizer {path}: {e.strerror}") from None
    except ValueError:
        raise XllamaError(f"cannot read tokenizer {path}: line {n} is not 'base64-token "
                          "rank'") from None
    return ranks


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: Path, specials: Specials | None = None) -> None:
        import tiktoken

        self.path = path
        specials = specials or Specials()
        ranks = _read_ranks(path)
        n = len(ranks)
        names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>"
                                   for i in range(2, 2 + LLAMA3_N_SPECIALS - len(LLAMA3_SPECIALS))]
        by_id = {n + i: t for i, t in enumerate(names)}
        # the checkpoint's own names
        by_id.update({i: t for i, (t, _) in specials.added.items() if i >= n})
        self.added = {t: i for i, t in by_id.items()}
        try:
            self.enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN,
                                         mergeable_ranks=ranks, special_tokens=self.added)
        except ValueError as e:
            raise XllamaError(f"cannot read tokenizer {path}: {e}") from None
        self.vocab_size = max([n - 1, *by_id]) + 1
        self.special_ids = frozenset(by_id)
        self.by_id = by_id
        bos = self.added.get("<|begin_of_text|>")
        own = {"bos": [bos] if bos is not None else [],
               "eos": [self.added[t] for t in LLAMA3_STOP if t in self.added]}
        self._resolve(specials, own)

    def _ordinary(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    _plain = _ordinary

    def _with_special(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all", disallowed_special=())

    def token_text(self, token_id: int) -> str | None:
        if token_id in self.by_id:
            return self.by_id[token_id]
        try:
            return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
        except KeyError:
            return None

    def piece_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_ids:
            return b""
        try:
            return self.enc.decode_single_token_bytes(token_id)
        except KeyError:
            return b""

    def _decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


# ---- choosing the implementation ----
def _is_tiktoken(path: Path) -> bool:
    with open(path, "rb") as f:
        return TIKTOKEN_LINE.match(f.read(256)) is not None


# file name -> (sniff, implementation), tried in order; a folder with both files uses
# tokenizer.json, as transformers does
KINDS: list[tuple[str, Callable[[Path], bool], type[Tokenizer]]] = [
    ("tokenizer.json", lambda p: True, TokenizersTokenizer),
    ("tokenizer.model", _is_tiktoken, TiktokenTokenizer),
    ("tokenizer.model", lambda p: True, SentencePieceTokenizer),
]


def open_tokenizer_file(path: Path, specials: Specials | None = None) -> Tokenizer:
    """The tokenizer in one file, its kind told by its name and content."""
    if not path.is_file():
        raise XllamaError(f"tokenizer file {str(path)!r} does not exist")
    name = "tokenizer.json" if path.suffix == ".json" else "tokenizer.model"
    try:
        for kind_name, sniff, cls in KINDS:
            if kind_name == name and sniff(path):
                return cls(path, specials)
    except OSError as e:
        raise XllamaError(f"cannot read tokenizer {path}: {e.strerror}") from None
    raise AssertionError("the last kind of each name accepts every file")


def find_tokenizer_file(folder: Path) -> Path | None:
    """The folder's tokenizer.json, else its tokenizer.model, else the parent's tokenizer.model
    (Meta's downloads keep one tokenizer beside the model folders)."""
    for p in (folder / "tokenizer.json", folder / "tokenizer.model",
              folder.parent / "tokenizer.model"):
        if p.is_file():
            return p
    return None


def load_tokenizer(path: str | Path | Checkpoint) -> Tokenizer:
    """The tokenizer of a folder (a checkpoint, a Hugging Face repo id in the local cache, or just
    tokenizer files), of a checkpoint already opened, or of a tokenizer.json / tokenizer.model file;
    special tokens come from the files beside it."""
    if not isinstance(path, (str, PathLike)):  # an opened Checkpoint: its folder is checked already
        path = folder = path.path
    else:
        path = Path(path).expanduser()
        if path.is_file():
            return open_tokenizer_file(path, read_specials(path.parent))
        if path.is_dir() and find_tokenizer_file(path) is not None:
            folder = path
        else:
            from .checkpoint import open_checkpoint
            from .download import resolve_model

            # the checks and messages every command gives for --model
            folder = open_checkpoint(resolve_model(path)).path
    tok_path = find_tokenizer_file(folder)
    if tok_path is None:
        raise XllamaError(f"no tokenizer.model or tokenizer.json in {str(path)!r} (nor "
                          "tokenizer.model in its parent folder); copy the checkpoint's tokenizer "
                          "files there")
    return open_tokenizer_file(tok_path, read_specials(folder))
