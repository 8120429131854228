"""Plots of block scores, of the block-set search and two-panel line charts (matplotlib, Agg backend: no display
needed)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def plot_scores(scores: Sequence[float | None], path: str | os.PathLike, *, title: str = "",
                ylabel: str = "score", highlight: Sequence[int] = ()) -> Path:
    """Write a bar chart of one score per block to ``path`` (PNG); ``highlight`` bars are drawn red."""
    marked = set(highlight)
    xs = list(range(len(scores)))
    ys = [float("nan") if s is None else s for s in scores]
    with _figure(path, figsize=(max(6.0, 0.25 * len(xs) + 2), 3.5)) as (_, ax):
        ax.bar(xs, ys, color=["tab:red" if i in marked else "tab:blue" for i in xs])
        ax.set_xlabel("block")
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs[:: max(1, len(xs) // 32)])
        if title:
            ax.set_title(title)
        finite = [y for y in ys if y == y]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
            ax.set_yscale("log")  # ppl of removing the first block dwarfs the rest
    return Path(path)


def plot_search(search: dict[str, Any], path: str | os.PathLike, *, title: str = "") -> Path:
    """Write the search's fitness over generations to ``path`` (PNG): the parent's fitness (a step line),
    each generation's best child on the full calibration set (dots), and the starting selections."""
    history = search["history"]
    gens = [h["generation"] for h in history]
    with _figure(path, figsize=(7.0, 3.5)) as (_, ax):
        ax.plot(gens[1:], [h["candidate"] for h in history[1:]], ".", color="tab:gray", label="best child")
        ax.step(gens, [h["fitness"] for h in history], where="post", color="tab:blue", label="parent")
        for name, start in search["starts"].items():
            ax.axhline(start["fitness"], color="tab:orange", lw=0.6, ls=":")
            ax.annotate(name, (0, start["fitness"]), fontsize=7, color="tab:orange", va="bottom")
        ax.set_xlabel("generation")
        ax.set_ylabel(f"fitness ({search['fitness_kind']})")
        finite = [s["fitness"] for s in search["starts"].values()] + [h["candidate"] for h in history]
        if min(finite) > 0 and max(finite) / min(finite) > 20:
            ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
        if title:
            ax.set_title(title)
    return Path(path)


def plot_two_panels(lines: Sequence[tuple[str, str, Sequence[float], Sequence[float], Sequence[float]]],
                    path: str | os.PathLike, *, xlabel: str, ylabels: tuple[str, str], title: str,
                    log_base: float = 10) -> Path:
    """Two panels side by side over the same x values (log scale): one line per (label, style, x, left y,
    right y)."""
    with _figure(path, 1, 2, figsize=(10, 4), dpi=120) as (fig, axes):
        for label, style, x, left, right in lines:
            axes[0].plot(x, left, style, label=label)
            axes[1].plot(x, right, style, label=label)
        from matplotlib.ticker import NullFormatter

        ticks = sorted({v for _, _, x, _, _ in lines for v in x})
        for ax, ylabel in zip(axes, ylabels):
            ax.set_xscale("log", base=log_base)
            ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])  # the measured x values, as plain numbers
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(title)
    return Path(path)


@contextlib.contextmanager
def _figure(path: str | os.PathLike, *grid: int, figsize: tuple[float, float], dpi: int = 100) -> Iterator[Any]:
    """``(figure, axes)`` to draw on; laid out and written to ``path`` when the block ends, closed always."""
    plt = _pyplot()
    fig, axes = plt.subplots(*grid, figsize=figsize)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
