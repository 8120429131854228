"""A bar chart of block scores (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def plot_scores(scores: Sequence[float | None], path: str | os.PathLike, *, title: str = "",
                ylabel: str = "score", highlight: Sequence[int] = ()) -> Path:
    """Write a bar chart of one score per block to ``path`` (PNG); ``highlight`` bars are drawn red."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    marked = set(highlight)
    xs = list(range(len(scores)))
    ys = [float("nan") if s is None else s for s in scores]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(xs) + 2), 3.5))
    try:
        ax.bar(xs, ys, color=["tab:red" if i in marked else "tab:blue" for i in xs])
        ax.set_xlabel("block")
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs[:: max(1, len(xs) // 32)])
        if title:
            ax.set_title(title)
        finite = [y for y in ys if y == y]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
            ax.set_yscale("log")  # ppl of removing the first block dwarfs the rest
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
