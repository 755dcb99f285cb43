"""The one place that prints: results to stdout, status and summaries to stderr.

Under torchrun only rank 0 prints (the other ranks compute the same text); see parallel.py.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

# torchrun sets RANK before the process starts; a single process has none
PRIMARY = os.environ.get("RANK", "0") == "0"
# errors a rank other than 0 did not print; parallel.run_command says them if rank 0 does not
withheld: list[str] = []

err = Console(stderr=True, highlight=False, quiet=not PRIMARY)
out = Console(highlight=False, quiet=not PRIMARY)


def info(message: str) -> None:
    """A status line on stderr (dim), dropped by nothing: use for what the user should see."""
    err.print(message, style="dim", markup=False)  # quiet on ranks other than 0


def error(message: str) -> None:
    # every rank meets an error in the arguments, and load_model makes a rank's own failure
    # everyone's (parallel.agree_on_errors): rank 0 alone says it
    if not PRIMARY:
        withheld.append(message)
        return
    # plain write: one line, no wrapping, no markup, whatever the terminal width
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def write(text: str) -> None:
    """Streamed model output on stdout, as it is produced."""
    if not PRIMARY:
        return
    sys.stdout.write(text)
    sys.stdout.flush()
