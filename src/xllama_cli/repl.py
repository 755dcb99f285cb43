"""The terminal side of `xllama chat`: the interactive prompt, its commands, and the piped mode."""

from __future__ import annotations

from typing import Iterable, TextIO

from . import report
from .chat import ChatSession
from .errors import XllamaError, require_utf8

HELP = """commands:
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (/system alone removes it)
  /stats         tokens in the context, the last turn's prefill and decode speed
  /help          this list
  /exit          leave (or Ctrl-D); Ctrl-C stops an answer"""


class _AnswerWriter:
    """Streams an answer to stdout, without the whitespace it starts with."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            report.write(text)


def command(session: ChatSession, line: str) -> bool:
    """Run a /command; False when it asks to leave."""
    name, _, arg = line.strip().partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        report.info("conversation cleared"
                    + (" (the system prompt stays)" if session.system else ""))
    elif name == "/system":
        session.set_system(arg)
        report.info(f"system prompt set: {session.system}" if session.system
                    else "system prompt removed")
    elif name == "/stats":
        report.info(session.stats())
    elif name == "/help":
        report.info(HELP)
    else:
        report.info(f"unknown command {name}; /help lists the commands")
    return True


def interactive(session: ChatSession) -> None:
    """A prompt with line editing and history; Ctrl-C stops an answer, Ctrl-D or /exit leaves."""
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:  # not on every platform; input() still works without it
        pass
    report.info("type a message; /help lists the commands, /exit or Ctrl-D leaves")
    while True:
        try:
            line = input("> ")
        except EOFError:
            report.write("\n")
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
            report.write("\n")
            continue
        if not line.strip():
            continue
        try:
            require_utf8(line, "the message")
        except XllamaError as e:  # said, and the session goes on
            report.error(str(e))
            continue
        if line.lstrip().startswith("/"):
            if not command(session, line):
                return
            continue
        try:
            session.ask(line, _AnswerWriter())
            report.write("\n\n")
        except KeyboardInterrupt:
            report.write("\n")
            report.info("(stopped)")
        except XllamaError as e:  # e.g. special tags in the message: say so, keep the session
            report.error(str(e))


def piped(session: ChatSession, lines: Iterable[str]) -> None:
    """Each non-empty line is one user message (or a /command); the answers go to stdout, one block
    a turn, blocks separated by an empty line; nothing else goes to stdout."""
    first = True
    for number, raw in enumerate(lines, 1):
        line = require_utf8(raw.rstrip("\r\n"), f"line {number} of the input")
        if not line.strip():
            continue
        if line.lstrip().startswith("/"):
            if not command(session, line):
                return
            continue
        if not first:
            report.write("\n")
        first = False
        session.ask(line, _AnswerWriter())  # bad input raises: `error: ...`, exit 2
        report.write("\n")


def run(session: ChatSession, stdin: TextIO) -> None:
    # bytes that are not UTF-8 reach require_utf8, not a traceback
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="surrogateescape")
    try:
        if stdin.isatty():
            interactive(session)
        else:
            piped(session, stdin)
    finally:
        session.close()
