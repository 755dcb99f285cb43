"""The OpenAI API's shapes, apart from any web framework: a request body checked and turned into
an engine Request (`parse_chat`, `parse_completion`), and the engine's events turned into response
bodies and stream chunks (`Reply`). serve.py puts these on HTTP.

Field names, types, defaults and response shapes are OpenAI's; a field the API has and xllama
cannot honour (n > 1, tools, echo ...) is refused with a 400, and fields it does not know are
ignored, as OpenAI's own clients send some of their own."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .errors import XllamaError, is_real, is_whole

if TYPE_CHECKING:
    from .chat import Format
    from .engine import Event, TokenLogprob
    from .sampling import Sampling
    from .tokenizer import Tokenizer

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}  # OpenAI's limits for each endpoint
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty")


class ApiError(Exception):
    """A failure the client is told of: an HTTP status and OpenAI's error object."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
             404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.logged = False  # said in a request's own log line already

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_body: int = 1 << 20  # bytes of a request body
    max_tokens: int | None = None  # the largest max_tokens; None: the model's context
    max_messages: int = 256  # messages in one chat request


@dataclass(frozen=True)
class Model:
    """What parsing a request needs to know of the served model."""

    name: str
    tokenizer: Tokenizer
    chat_format: Format
    context: int  # positions the model may use
    limits: Limits = Limits()


@dataclass
class Job:
    """A checked request: what the engine runs and how the answer is to be shaped."""

    kind: str  # "chat" or "completion"
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    logprobs: int | None  # None: none; k: the chosen token's logprob and the top k
    stream: bool
    include_usage: bool


# ---- reading fields ----
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (is_whole, "an integer"),
    "number": (is_real, "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "array": (lambda v: isinstance(v, list), "an array"),
}


def get(body: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """body[name] if it has the kind's type; absent or null: `default`."""
    value = body.get(name)
    if value is None:
        return default
    ok, what = KINDS[kind]
    if not ok(value):
        raise bad(f"'{name}' must be {what}, not {_json_type(value)}", name, "invalid_type")
    return value


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def refuse_unsupported(body: dict[str, Any], allowed: dict[str, Any]) -> None:
    """Fields of the API that xllama cannot honour: only their default (or null) passes."""
    for name, default in allowed.items():
        value = body.get(name)
        if value is not None and value != default and not (value == [] or value == {}):
            raise bad(f"'{name}' is not supported by this server (only {default!r})", name,
                      "unsupported_parameter")


def check_range(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise bad(f"'{name}' is {value}; it must be from {low} to {high}", name)
    return value


def sampling(body: dict[str, Any]) -> Sampling:
    """The sampling settings, each checked by Sampling itself (the command line's one
    implementation); OpenAI's defaults: temperature 1, top_p 1."""
    from .sampling import Sampling

    values = {"temperature": get(body, "temperature", "number", 1.0),
              "top_p": get(body, "top_p", "number", 1.0),
              "seed": get(body, "seed", "int"),
              "frequency_penalty": get(body, "frequency_penalty", "number", 0.0),
              "presence_penalty": get(body, "presence_penalty", "number", 0.0)}
    try:
        return Sampling(**values)
    except XllamaError as e:
        raise bad(str(e), _failing(values)) from None


def _failing(values: dict[str, Any]) -> str | None:
    """The one field Sampling refuses on its own (for the error's `param`)."""
    from .sampling import Sampling

    for name, value in values.items():
        try:
            Sampling(**{name: value})
        except XllamaError:
            return name
    return None


def stop_strings(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' has {len(stops)} strings; at most {MAX_STOP} are allowed", "stop")
    if any(s == "" for s in stops):
        raise bad("'stop' strings must not be empty", "stop")
    return stops


def max_tokens(body: dict[str, Any], model: Model, prompt_tokens: int) -> int:
    """max_completion_tokens (or the older max_tokens), at most the server's limit; unset: what
    the context leaves after the prompt (the engine also ends a request at the context)."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    value = get(body, name, "int")
    limit = model.limits.max_tokens or model.context
    if value is None:
        return max(1, min(limit, model.context - prompt_tokens))
    return check_range(name, value, 1, limit)


def check_context(model: Model, prompt: list[int], what: str) -> None:
    if len(prompt) >= model.context:
        raise bad(f"the {what} take {len(prompt)} tokens but the model's context is "
                  f"{model.context}; shorten them", "messages" if what == "messages" else "prompt",
                  "context_length_exceeded")


def stream_settings(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = get(body, "stream", "bool", False)
    options = get(body, "stream_options", "object", {})
    if options and not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("'stream_options.include_usage' must be a boolean", "stream_options",
                  "invalid_type")
    return stream, include


def common(body: dict[str, Any]) -> None:
    get(body, "model", "str")  # one model is served: any name is taken as it
    if get(body, "n", "int", 1) != 1:
        raise bad("'n' must be 1: this server makes one choice per request", "n")
    refuse_unsupported(body, {"logit_bias": None, "best_of": 1, "echo": False, "suffix": None})


# ---- chat ----
def messages(body: dict[str, Any], limit: int) -> list[dict[str, str]]:
    """The messages as the chat formats take them: role and text (text parts joined, OpenAI's
    `developer` role as `system`)."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty array of messages", "messages",
                  "invalid_type" if value is not None else None)
    if len(value) > limit:
        raise bad(f"'messages' has {len(value)} messages; this server takes at most {limit}",
                  "messages")
    return [_message(m, i) for i, m in enumerate(value)]


def _message(m: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"'{where}' must be an object with 'role' and 'content'", where, "invalid_type")
    role = {"developer": "system"}.get(m.get("role"), m.get("role"))
    if role not in ("system", "user", "assistant"):
        raise bad(f"'{where}.role' is {m.get('role')!r}; it must be system, developer, user or "
                  "assistant (tools are not supported)", f"{where}.role")
    return {"role": role, "content": _content(m.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
        raise bad(f"'{where}' may hold only text parts on this server", where)
    raise bad(f"'{where}' must be a string or an array of text parts", where, "invalid_type")


def parse_chat(body: dict[str, Any], model: Model) -> Job:
    common(body)
    refuse_unsupported(body, {"tools": None, "functions": None, "tool_choice": "none",
                              "function_call": "none", "audio": None})
    fmt = get(body, "response_format", "object", {"type": "text"})
    if fmt.get("type") != "text":
        raise bad("'response_format' must be {\"type\": \"text\"} on this server",
                  "response_format")
    dialog = messages(body, model.limits.max_messages)
    want = get(body, "logprobs", "bool", False)
    top = get(body, "top_logprobs", "int")
    if top is not None and not want:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if top is not None:
        check_range("top_logprobs", top, 0, MAX_TOP_LOGPROBS["chat"])
    stream, include_usage = stream_settings(body)
    s, stops = sampling(body), stop_strings(body)
    try:
        prompt = model.chat_format(dialog, model.tokenizer)
    except XllamaError as e:
        raise bad(str(e), "messages") from None
    check_context(model, prompt, "messages")
    return Job("chat", prompt, max_tokens(body, model, len(prompt)), s, stops,
               (top or 0) if want else None, stream, include_usage)


# ---- completions ----
def prompt_ids(body: dict[str, Any], model: Model) -> list[int]:
    """`prompt`: a text (BOS first, as `generate` encodes it), one text in an array, or token
    ids."""
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return model.tokenizer.encode(value)
    if isinstance(value, list) and value and all(is_whole(t) for t in value):
        return list(value)
    if isinstance(value, list) and len(value) > 1:
        raise bad("'prompt' must be one prompt: this server makes one choice per request",
                  "prompt")
    raise bad("'prompt' must be a string or an array of token ids", "prompt",
              "invalid_type" if value is not None else None)


def parse_completion(body: dict[str, Any], model: Model) -> Job:
    common(body)
    prompt = prompt_ids(body, model)
    if not prompt:
        raise bad("'prompt' encodes to no tokens", "prompt")
    k = get(body, "logprobs", "int")
    if k is not None:
        check_range("logprobs", k, 0, MAX_TOP_LOGPROBS["completion"])
    stream, include_usage = stream_settings(body)
    s, stops = sampling(body), stop_strings(body)
    check_context(model, prompt, "prompt")
    return Job("completion", prompt, max_tokens(body, model, len(prompt)), s, stops, k, stream,
               include_usage)


# ---- responses ----
def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text as OpenAI shows it (bytes of a partial character escaped) and its bytes."""
    raw = tokenizer.piece_bytes(token)
    return raw.decode("utf-8", errors="backslashreplace"), list(raw)


@dataclass
class Reply:
    """One request's answer, built from the engine's events: the whole body, or stream chunks."""

    job: Job
    model: str
    tokenizer: Tokenizer
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.job.kind == "chat" else "cmpl-"
        self.id = self.id or prefix + secrets.token_hex(12)
        self.prompt_tokens = len(self.job.prompt)

    @property
    def object(self) -> str:
        return "chat.completion" if self.job.kind == "chat" else "text_completion"

    def add(self, event: Event) -> None:
        self.text += event.text
        self.logprobs += event.logprobs or []
        self.completion_tokens += len(event.tokens)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.prompt_tokens = getattr(event, "prompt_tokens", None) or self.prompt_tokens
            self.completion_tokens = getattr(event, "new_tokens", None) \
                if getattr(event, "new_tokens", None) is not None else self.completion_tokens

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def body(self) -> dict[str, Any]:
        """The whole response (stream false), once the last event is in."""
        logprobs = self._logprobs(self.logprobs, 0)
        if self.job.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text,
                                              "refusal": None},
                      "logprobs": logprobs, "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": logprobs,
                      "finish_reason": self.finish_reason}
        return {**self._head(self.object), "choices": [choice], "usage": self.usage()}

    def first_chunk(self) -> dict[str, Any] | None:
        """A chat stream opens with the assistant's role (completions have no such chunk)."""
        if self.job.kind != "chat":
            return None
        return self._chunk({"role": "assistant", "content": ""}, None, None)

    def chunk(self, event: Event, offset: int) -> dict[str, Any] | None:
        """The stream chunk of one event (None when it carries nothing to say); `offset`: the
        length of the text already sent, for completions' text_offset."""
        if not event.text and not event.logprobs and event.finish_reason is None:
            return None
        logprobs = self._logprobs(event.logprobs or [], offset)
        if self.job.kind == "chat":
            delta = {"content": event.text} if event.text or event.logprobs else {}
            return self._chunk(delta, logprobs, event.finish_reason)
        choice = {"index": 0, "text": event.text, "logprobs": logprobs,
                  "finish_reason": event.finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def _chunk(self, delta: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if self.job.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        """stream_options.include_usage: the last chunk, no choices, the usage."""
        obj = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage()}

    def _logprobs(self, items: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
        if self.job.logprobs is None:
            return None
        if self.job.kind == "chat":
            return {"content": [self._chat_logprob(t) for t in items], "refusal": None}
        return self._completion_logprobs(items, offset)

    def _chat_logprob(self, t: TokenLogprob) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text, raw = token_text(self.tokenizer, token)
            return {"token": text, "logprob": logprob, "bytes": raw}

        return {**entry(t.token, t.logprob),
                "top_logprobs": [entry(tok, lp) for tok, lp in t.top]}

    def _completion_logprobs(self, items: list[TokenLogprob], offset: int) -> dict[str, Any]:
        texts = [token_text(self.tokenizer, t.token)[0] for t in items]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [{token_text(self.tokenizer, tok)[0]: lp for tok, lp in t.top}
                                 for t in items],
                "text_offset": offsets}
