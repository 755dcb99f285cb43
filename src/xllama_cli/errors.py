"""The one exception type for failures a user can fix, and the checks of text a user gives."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Mapping


class XllamaError(Exception):
    """A user-facing failure: the CLI prints `error: <message>` on one line and exits with 2."""


class SettingError(XllamaError):
    """A setting's value the library cannot serve. Its text names settings as `{attn}`, `{groups}`,
    ... (keys of PLAIN): str() words them plainly, and an interface words them as its own options
    (`worded`: the CLI's flags), so the library's text knows nothing of the command line."""

    PLAIN = {"attn": "attention layout", "groups": "KV group count", "method": "pooling method",
             "rope": "RoPE rule", "rope_factor": "RoPE factor", "quantize": "quantization",
             "dtype": "dtype", "device": "device", "compile": "compilation"}

    def __init__(self, template: str, **values: object) -> None:
        self.template, self.values = template, values
        super().__init__(self.worded(self.PLAIN))

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with each setting called by `names` (plain words where it has none)."""
        return self.template.format_map({**self.PLAIN, **names, **self.values})

    def __reduce__(self):  # pickled whole (multiprocessing), not as the one-argument Exception
        return partial(type(self), self.template, **self.values), ()


def is_whole(x: object) -> bool:
    """An int that is not a bool (JSON and Python both let True pass as 1)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    """An int or float that is not a bool; NaN passes here and fails every range check after."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def require_utf8(text: str, what: str) -> str:
    """`text` as given, if it came from valid UTF-8. Arguments and stdin reach Python with invalid
    bytes kept as lone surrogates (surrogateescape), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        byte = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        raise XllamaError(f"{what} is not valid UTF-8 ({byte} at character {e.start + 1}); "
                          "save it as UTF-8 text") from None
    return text


def read_utf8(path: str | Path, what: str) -> str:
    """The text of a file that must be UTF-8, or one error line saying why it cannot be read."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise XllamaError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise XllamaError(f"{what} {str(path)!r} is a folder; pass a text file") from None
    except OSError as e:
        raise XllamaError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise XllamaError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line "
                          f"{line}); save it as UTF-8") from None
