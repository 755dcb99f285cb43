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
    err.print(message, style="dim", markup=False, soft_wrap=True)  # one line, whatever the width


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


class progress:
    """A rich progress bar on stderr: `with progress(total, "label") as advance: advance(n)`.

    Drawn only on a terminal (logs and pipes stay clean), and not at all when `enabled` is False.
    """

    def __init__(self, total: float, description: str, *, unit: str = "",
                 enabled: bool = True) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        done = (MofNCompleteColumn() if unit != "bytes"
                else TextColumn("{task.percentage:>3.0f}%"))
        columns = [TextColumn("{task.description}"), BarColumn(), done,
                   TextColumn(unit if unit != "bytes" else ""), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        self._bar = Progress(*columns, console=err, disable=not (enabled and err.is_terminal))
        self._description = description
        self._task = self._bar.add_task(description, total=total)

    def __enter__(self):
        self._bar.start()
        return self.advance

    def advance(self, n: float = 1, note: str | None = None) -> None:
        """Move on by n; `note` (e.g. the current loss) is shown after the label."""
        if note is None:
            self._bar.advance(self._task, n)
        else:
            self._bar.update(self._task, advance=n, description=f"{self._description} {note}")

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:  # done: a total estimated from file sizes shows 100% too
            self._bar.update(self._task, completed=self._bar.tasks[0].total)
        self._bar.stop()


def write_json(obj) -> None:
    import json

    write(json.dumps(obj) + "\n")


def perplexity_summary(r) -> None:
    """An `evaluate.PerplexityResult` as a few aligned lines on stdout."""
    write(f"perplexity     {r.perplexity:.4f}\n"
          f"tokens scored  {r.tokens_scored}\n"
          f"tokens/s       {r.tokens_per_s:.1f}\n"
          f"windows        {r.windows} (context {r.context}, stride {r.stride})\n")


def table(columns: list[str], rows: list[list[str]], *, title: str | None = None,
          caption: str | None = None, left: int = 1) -> None:
    """A table on stdout that stays whole at 80 columns and in a pipe: one space between columns,
    headers may break at their newlines, and a cell too wide is folded onto a second line, never cut
    short with an ellipsis. The first `left` columns are left-aligned (labels), the rest right
    (figures)."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, padding=(0, 0),
              pad_edge=False, title_justify="left", caption_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < left else "right", overflow="fold")
    for row in rows:
        t.add_row(*row)
    out.print(t)


def perplexity_table(rows) -> None:
    """(label, model name, KV heads, PerplexityResult) rows side by side, with the change against
    the first."""
    base = rows[0][3].perplexity
    table(["", "model", "KV heads", "perplexity", "change", "tokens", "tok/s"],
          [[label, name, str(kv), f"{r.perplexity:.4f}", f"{(r.perplexity / base - 1) * 100:+.2f}%",
            str(r.tokens_scored), f"{r.tokens_per_s:.0f}"] for label, name, kv, r in rows], left=2)

def transfer_progress():
    """Byte progress bars on stderr, one task per file (downloads)."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
