"""The loss log of a healing run as CSV and as a plot."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any


def write_loss_csv(path: str | os.PathLike, train_log: list[dict[str, Any]], val_log: list[dict[str, Any]]) -> None:
    """One row per optimizer step (train loss, lr) and per evaluation (val loss), sorted by step."""
    rows = [{"step": e["step"], "split": "train", "loss": e["loss"], "lr": e["lr"]} for e in train_log]
    rows += [{"step": e["step"], "split": "val", "loss": e["val_loss"], "lr": ""} for e in val_log]
    rows.sort(key=lambda r: (r["step"], r["split"]))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "split", "loss", "lr"])
        writer.writeheader()
        writer.writerows(rows)


def plot_losses(path: str | os.PathLike, train_log: list[dict[str, Any]], val_log: list[dict[str, Any]],
                title: str = "healing", best_step: int | None = None) -> Path:
    """``loss.png``: training loss per step and validation loss per evaluation."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train_log:
        ax.plot([e["step"] for e in train_log], [e["loss"] for e in train_log], label="train", lw=1, alpha=0.8)
    if val_log:
        ax.plot([e["step"] for e in val_log], [e["val_loss"] for e in val_log], "o-", label="validation", lw=1.5)
    if best_step is not None:
        ax.axvline(best_step, color="grey", ls=":", lw=1, label=f"best (step {best_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
