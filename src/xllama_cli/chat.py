"""Chat: Llama 2's chat format (token for token as Meta's reference encodes it), a plain template
for base models, a checkpoint's own Jinja template, the choice among them, and a session that keeps
the KV cache between turns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .chat_template import ChatTemplate, find_chat_template, read_template_source
from .errors import XllamaError

if TYPE_CHECKING:  # torch loads with the session, so the formats stay usable without it
    from .engine import Event, Step
    from .model import Transformer
    from .parallel import TensorParallel
    from .sampling import Sampling
    from .tokenizer import Tokenizer

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

# Meta's llama/generation.py (Llama 2)
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]


def _split_dialog(dialog: list[Message]) -> tuple[str | None, list[Message]]:
    """(system prompt or None, the user/assistant turns), checking roles as Meta's reference
    does."""
    if not dialog:
        raise XllamaError("the dialog is empty; it needs at least one user message")
    for m in dialog:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise XllamaError(f"bad message {m!r}: each needs a role (system, user, assistant) and "
                              "a str content")
    system = dialog[0]["content"] if dialog[0]["role"] == "system" else None
    turns = dialog[1:] if system is not None else list(dialog)
    ok = (turns and all(m["role"] == "user" for m in turns[::2])
          and all(m["role"] == "assistant" for m in turns[1::2]) and turns[-1]["role"] == "user")
    if not ok:
        raise XllamaError("the dialog must be an optional system message, then user and assistant "
                          "messages in turn, ending with a user message")
    return system, turns


def format_llama2_chat(dialog: list[Message], tokenizer: Tokenizer) -> list[int]:
    """Token ids of a dialog in Llama 2's chat format, as Meta's reference `chat_completion` makes
    them: every past exchange is BOS [INST] {user} [/INST] {answer} EOS, the system prompt is
    folded into the first user message, and the last user message ends after [/INST].

    System and user messages holding the special tags are refused (Meta's reference refuses them
    in any message; answers are the model's own words here, so they are not checked).
    """
    system, turns = _split_dialog(dialog)
    checked = ([("system", system)] if system is not None else []) + \
              [(m["role"], m["content"]) for m in turns if m["role"] == "user"]
    for role, content in checked:
        found = [tag for tag in SPECIAL_TAGS if tag in content]
        if found:
            raise XllamaError(f"the {role} message contains {found[0]}, which Llama 2's chat "
                              f"format reserves; remove the tags {', '.join(SPECIAL_TAGS)} from it")
    if system is not None:
        first = {"role": "user", "content": B_SYS + system + E_SYS + turns[0]["content"]}
        turns = [first] + turns[1:]
    ids: list[int] = []
    for prompt, answer in zip(turns[::2], turns[1::2]):
        exchange = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tokenizer.encode(exchange, bos=True, eos=True)
    last = f"{B_INST} {turns[-1]['content'].strip()} {E_INST}"
    ids += tokenizer.encode(last, bos=True, eos=False)
    return ids


def format_plain(dialog: list[Message], tokenizer: Tokenizer) -> list[int]:
    """Token ids of a dialog for a base model: one text with no tags, BOS first. The system prompt
    and a blank line, then each user message followed by its answer (a continuation of the user's
    text, kept as it is), one exchange a line; the last user message ends the text."""
    system, turns = _split_dialog(dialog)
    text = f"{system.strip()}\n\n" if system and system.strip() else ""
    for prompt, answer in zip(turns[::2], turns[1::2]):
        text += prompt["content"].strip() + answer["content"].rstrip() + "\n"
    text += turns[-1]["content"].strip()
    return tokenizer.encode(text, bos=True)


Format = Callable[[list[Message], "Tokenizer"], list[int]]

TEMPLATES: dict[str, Format] = {
    "llama2": format_llama2_chat,
    "plain": format_plain,
}
CHOICES = "auto, llama2, plain, or a .jinja file"


@dataclass(frozen=True)
class JinjaFormat:
    """A Jinja chat template as a chat format: the dialog is checked as the other formats check it,
    and the answer's header follows the last user message."""

    template: ChatTemplate

    def __call__(self, dialog: list[Message], tokenizer: Tokenizer) -> list[int]:
        _split_dialog(dialog)
        return self.template.encode(dialog, tokenizer, add_generation_prompt=True)

    def __str__(self) -> str:
        return self.template.origin


def is_llama2_template(source: str) -> bool:
    """Llama 2 chat's own template: [INST] turns with the <<SYS>> block (Mistral's [INST] has
    none)."""
    return B_INST in source and "<<SYS>>" in source


def choose_template(path: str | Path, choice: str = "auto") -> tuple[str | JinjaFormat, str]:
    """The chat format for --template `choice` and a checkpoint, and why.

    auto: the checkpoint's own chat template, except Llama 2's [INST] one, which keeps Meta's exact
    encoding (llama2); without a template, llama2 when the folder or repo name contains 'chat', else
    plain. A path to a .jinja file renders that template."""
    from .download import resolve_model

    if choice in TEMPLATES:
        return choice, f"--template {choice}"
    if choice != "auto":
        file = Path(choice).expanduser()
        if not (file.suffix == ".jinja" or file.is_file()):
            raise XllamaError(f"unknown --template {choice!r}; choose one of: {CHOICES}")
        if not file.is_file():
            raise XllamaError(f"--template {choice}: no such file; give the path of a Jinja chat "
                              "template")
        template = ChatTemplate(read_template_source(file), file.name).check()
        return JinjaFormat(template), f"--template {choice}"
    folder = resolve_model(path).expanduser().resolve()
    own = find_chat_template(folder) if folder.is_dir() else None
    if own is not None:
        if is_llama2_template(own.source):
            return "llama2", f"{own.origin} is Llama 2's [INST] chat template"
        return JinjaFormat(own.check()), "the checkpoint's own"
    # the folder's own name, and the repo name in a Hugging Face cache path
    # (models--org--name/snapshots/<hash>)
    names = [folder.name] + [p.name for p in folder.parents if p.name.startswith("models--")]
    for name in names:
        if "chat" in name.lower():
            return "llama2", f"the name {name!r} contains 'chat'"
    return "plain", "no chat template and no 'chat' in the model's name"


@dataclass
class TurnStats:
    """What the last turn cost."""

    context_tokens: int = 0  # tokens in the cache after the turn
    prefill_tokens: int = 0  # tokens this turn had to run through the model before answering
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_tokens: int = 0  # decode steps (the first answer token comes from the prefill)
    decode_s: float = 0.0

    def summary(self, context: int) -> str:
        prefill_rate = self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0
        decode_rate = self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0
        return (f"context {self.context_tokens}/{context} tokens | last turn: prefill "
                f"{self.prefill_tokens} tokens in {self.prefill_s * 1e3:.1f} ms "
                f"({prefill_rate:.0f} tok/s) | answer {self.new_tokens} tokens, decode "
                f"{decode_rate:.1f} tok/s")


def check_settings(limit: int, context: int | None, max_new_tokens: int) -> None:
    """A chat's --context and --max-new-tokens against the model's context of `limit` tokens."""
    if context is not None and not 2 <= context <= limit:
        raise XllamaError(f"--context {context} is out of range: it must be between 2 and the "
                          f"model's context, {limit}")
    if max_new_tokens < 1:
        raise XllamaError("--max-new-tokens must be at least 1")


class ChatSession:
    """A conversation with one model, on an engine of one slot. The KV cache lives across turns
    and always holds a prefix of the formatted dialog: a new turn runs only the tokens past the
    longest prefix the cache already holds (its own message, and the few tokens that close the
    previous answer)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, template: str | Format = "llama2",
                 system: str | None = None, sampling: Sampling | None = None,
                 max_new_tokens: int = 512, context: int | None = None,
                 notify: Callable[[str], None] | None = None, *, step: Step | None = None,
                 tp: TensorParallel | None = None, stop: Sequence[str] = ()) -> None:
        from .engine import Engine, context_length
        from .sampling import Sampling

        sampling = sampling or Sampling()  # greedy
        if isinstance(template, str) and template not in TEMPLATES:
            raise XllamaError(f"unknown --template {template!r}; choose one of: "
                              f"{', '.join(TEMPLATES)}")
        limit = context_length(model)
        check_settings(limit, context, max_new_tokens)
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.format = TEMPLATES[template] if isinstance(template, str) else template
        self.context = context or limit
        self.engine = Engine(model, tokenizer, max_batch=1, step=step, tp=tp, context=self.context)
        self.system = system.strip() if system and system.strip() else None
        self.sampling, self.max_new_tokens, self.stop = sampling, max_new_tokens, tuple(stop)
        self.notify = notify or (lambda _message: None)
        self.turns: list[Message] = []  # user and assistant messages in turn
        self.last = TurnStats()

    @property
    def cached(self) -> list[int]:
        """The tokens whose keys and values the cache holds, slot by slot."""
        return self.engine.kept(0)

    @property
    def dialog(self) -> list[Message]:
        return self._with_system(self.turns)

    def _with_system(self, turns: list[Message]) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays (and so does its part of the cache)."""
        self.turns = []

    def set_system(self, text: str | None) -> None:
        self.system = text.strip() if text and text.strip() else None

    def stats(self) -> str:
        return self.last.summary(self.context)

    def close(self) -> None:
        self.engine.clear()

    def _fit(self, turns: list[Message]) -> tuple[list[int], int]:
        """The tokens of `turns`, the oldest exchanges dropped until they and an answer fit the
        context."""
        reserve = min(self.max_new_tokens, self.context // 2)  # room left for the answer
        dropped = 0
        while True:
            tokens = self.format(self._with_system(turns), self.tokenizer)
            if len(tokens) + reserve <= self.context or len(turns) == 1:
                break
            turns, dropped = turns[2:], dropped + 1
        if len(tokens) >= self.context:
            raise XllamaError(f"this message takes {len(tokens)} tokens"
                              f"{' with the system prompt' if self.system else ''}, but the "
                              f"context holds {self.context}; shorten it")
        from .engine import check_token_ids

        check_token_ids(tokens, self.model)
        return tokens, dropped

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer a user message: the answer streams through `on_text` and is returned. An exception
        while answering (Ctrl-C) keeps what was said so far in the dialog and the session usable."""
        from .engine import Request

        if not text.strip():
            raise XllamaError("the message is empty")
        user = {"role": "user", "content": text}
        tokens, dropped = self._fit(self.turns + [user])
        if dropped:
            self.turns = self.turns[2 * dropped:]
            what = "oldest exchange" if dropped == 1 else f"{dropped} oldest exchanges"
            self.notify(f"context full: dropped the {what}"
                        f"{' (the system prompt stays)' if self.system else ''}")
        pieces: list[str] = []

        def on_event(event: Event) -> None:
            pieces.append(event.text)
            if on_text is not None and event.text:
                on_text(event.text)

        handle = self.engine.add(Request(tokens, self.max_new_tokens, self.sampling, self.stop,
                                         on_event=on_event))
        self.turns.append(user)
        try:
            self.engine.run()
        except BaseException:
            # stopped (Ctrl-C): the request ends, and its slot keeps what surely reached the cache
            self.engine.cancel(handle)
            self.engine.step()
            raise
        finally:
            answer = "".join(pieces)
            self.turns.append({"role": "assistant", "content": answer})
            self.last = TurnStats(context_tokens=len(self.cached),
                                  prefill_tokens=handle.prefill_tokens,
                                  prefill_s=handle.prefill_s, new_tokens=len(handle.tokens),
                                  decode_tokens=handle.decode_tokens, decode_s=handle.decode_s)
        return answer
