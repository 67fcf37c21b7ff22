"""Plots of training runs (matplotlib, written as PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt

PANELS = (
    ("train_loss", "training loss", True),
    ("val_accuracy", "validation accuracy", False),
    ("usage", "codebook usage", False),
    ("perplexity", "perplexity", True),
)


def plot_history(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """PNG at ``path``: loss (log scale), accuracy, usage and perplexity per epoch."""
    path = Path(path)
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, label, log) in zip(axes, PANELS, strict=True):
        values = [row.get(key) for row in history]
        points = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None and v > 0]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
        if log and points:
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
