"""`xllama bench --plot`: time per sample against KV groups, in the style of the GQA paper's
figure 6.

matplotlib is an optional extra (`pip install 'xllama-cli[plot]'`), imported only here.
"""

from __future__ import annotations

from pathlib import Path

from .errors import XllamaError

MISSING = ("--plot needs matplotlib, which is not installed; install it with: pip install "
           "'xllama-cli[plot]'")


def require_matplotlib() -> None:
    """Fail before any measuring when --plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise XllamaError(MISSING) from None


def plot_groups(times: list[tuple[int, float, float]], n_heads: int, title: str,
                path: Path) -> None:
    """Stacked bars of time per sample, (group count, prefill s, decode s) each, on a log2 axis of
    group counts, and their sum; `n_heads` groups is labelled MHA, 1 MQA."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    from .writer import atomic_write

    xs = [g for g, _, _ in times]
    pre = [p for _, p, _ in times]
    dec = [d for _, _, d in times]
    # bars of equal width on the log2 axis: from g / 2^0.3 to g * 2^0.3
    lefts = [g * 2 ** -0.3 for g in xs]
    widths = [g * 2 ** 0.3 - left for g, left in zip(xs, lefts)]

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(lefts, pre, widths, align="edge", color="#4c9be8", label="prefill")
    ax.bar(lefts, dec, widths, bottom=pre, align="edge", color="#c0508a", label="decode")
    ax.plot(xs, [p + d for p, d in zip(pre, dec)], "o-", color="black", label="time per sample")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    labels = [f"{g}\n(MQA)" if g == 1 else f"{g}\n(MHA)" if g == n_heads else str(g) for g in xs]
    ax.set_xticks(xs, labels)
    ax.set_xlim(min(lefts) / 1.2, max(g + w for g, w in zip(lefts, widths)) * 1.2)
    ax.set_xlabel("KV groups (log2 scale)")
    ax.set_ylabel("time per sample (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left")
    fmt = path.suffix.lower().lstrip(".")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150))
