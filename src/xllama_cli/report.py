"""The one place that prints: results to stdout, status and summaries to stderr."""

from __future__ import annotations

import sys

from rich.console import Console

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def info(message: str) -> None:
    """A status line on stderr (dim), dropped by nothing: use for what the user should see."""
    err.print(message, style="dim", markup=False, soft_wrap=True)  # one line, whatever the width


def error(message: str) -> None:
    # plain write: one line, no wrapping, no markup, whatever the terminal width
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def write(text: str) -> None:
    """Streamed model output on stdout, as it is produced."""
    sys.stdout.write(text)
    sys.stdout.flush()
