"""A checkpoint's Jinja chat template, rendered as transformers renders it, and encoded so that only
the template's own markup becomes special ids: a control token spelled in a message stays text."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import XllamaError

if TYPE_CHECKING:
    import jinja2

    from .tokenizer import Tokenizer

# Unicode noncharacters, reserved for a program's internal use: they wrap the control tokens found
# in a user's text while the template renders, so the encoder can tell them from the template's own
MARK_START, MARK_END = "\ufdd0", "\ufdd1"


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> "jinja2.Template":
    """The template in transformers' environment: sandboxed, trim_blocks and lstrip_blocks, loop
    controls, and the same helpers (raise_exception, strftime_now, a tojson that keeps
    non-ASCII)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def compile_template(source: str, origin: str = "the chat template") -> "jinja2.Template":
    import jinja2

    try:
        return _compile(source)
    except jinja2.TemplateSyntaxError as e:
        raise XllamaError(f"{origin} is not a valid Jinja template: {_one_line(e)} "
                          f"(line {e.lineno})") from None


def render_chat_template(template: str, messages: list[dict[str, Any]], *, bos_token: str = "",
                         eos_token: str = "", add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """The text of `messages` in a Jinja chat template, as transformers' apply_chat_template renders
    it (tools and documents are None unless given). A template that fails raises XllamaError."""
    compiled = compile_template(template)
    context = {"tools": None, "documents": None, **variables, "bos_token": bos_token,
               "eos_token": eos_token, "add_generation_prompt": add_generation_prompt}
    try:
        return compiled.render(messages=messages, **context)
    except Exception as e:  # the template is foreign code: whatever it raises is one line
        raise XllamaError(f"the chat template failed: {_one_line(e)}") from None


@functools.lru_cache(maxsize=16)
def template_literals(source: str) -> str:
    """The template's literal text and string constants, joined by NUL so that no match spans two:
    an added token found here is part of the template's markup."""
    import jinja2.nodes

    ast = _compile(source).environment.parse(source)
    parts = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    parts |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(parts))


def _mark(value: Any, control: re.Pattern[str]) -> Any:
    """Every control token in the strings of `value` wrapped in the markers (markers a user typed
    are dropped first, so they cannot forge one)."""
    if isinstance(value, str):
        value = value.replace(MARK_START, "").replace(MARK_END, "")
        return control.sub(lambda m: MARK_START + m.group() + MARK_END, value)
    if isinstance(value, dict):
        return {k: _mark(v, control) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(v, control) for v in value]
    return value


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and where it came from (for messages)."""

    source: str
    origin: str

    def check(self) -> "ChatTemplate":
        compile_template(self.source, self.origin)
        return self

    def render(self, messages: list[dict[str, Any]], tokenizer: "Tokenizer",
               add_generation_prompt: bool = True, **variables: Any) -> str:
        try:
            return render_chat_template(self.source, messages,
                                        add_generation_prompt=add_generation_prompt,
                                        **{**tokenizer.special_text, **variables})
        except XllamaError as e:
            raise XllamaError(str(e).replace("the chat template", self.origin, 1)) from None

    def encode(self, messages: list[dict[str, Any]], tokenizer: "Tokenizer",
               add_generation_prompt: bool = True, **variables: Any) -> list[int]:
        """Token ids of the rendered chat. Control tokens (the tokenizer's special tokens, and added
        tokens the template writes) in the messages are encoded as text; the rest of the text is
        encoded as transformers' apply_chat_template(tokenize=True) encodes it."""
        literals = template_literals(self.source)
        control = tokenizer.control_tokens(also=lambda t: t in literals)
        pattern = "|".join(re.escape(t) for t in sorted(control, key=len, reverse=True)) or "(?!)"
        marked = _mark(messages, re.compile(pattern))
        text = self.render(marked, tokenizer, add_generation_prompt,
                           **_mark(variables, re.compile(pattern)))
        # [text, marked token, text, ...]; a lone marker (a template cut a marked token) splits as
        # None
        parts = re.split(f"{MARK_START}({pattern}){MARK_END}|[{MARK_START}{MARK_END}]", text)
        pieces = [(p or "", i % 2 == 1) for i, p in enumerate(parts)]
        return tokenizer.encode_chat(pieces)


def read_template_source(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise XllamaError(f"cannot read the chat template {path}: {why}") from None


def _pick(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a str, or a list of {"name", "template"} (the
    "default" one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def find_chat_template(folder: Path) -> ChatTemplate | None:
    """The checkpoint's own chat template: tokenizer_config.json's chat_template, else
    chat_template.jinja, else chat_template.json (where transformers versions keep it)."""
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            source = _pick(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            raise XllamaError(f"cannot read {config}: {e}") from None
        if source:
            return ChatTemplate(source, f"the chat template in {config.name}")
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(read_template_source(jinja), jinja.name)
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        try:
            source = _pick(json.loads(read_template_source(as_json)).get("chat_template"))
        except (ValueError, AttributeError) as e:
            raise XllamaError(f"cannot read {as_json}: {e}") from None
        if source:
            return ChatTemplate(source, f"the chat template in {as_json.name}")
    return None
