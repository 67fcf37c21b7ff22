"""Plots as PNG files: one training run's curves, and a comparison's loss, health, accuracy
and code-frequency figures. Figures are drawn on their own canvas
(``matplotlib.figure.Figure``), never through pyplot: matplotlib is imported on the first
plot, and the user's backend and open figures are left as they are."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabq.health.verdicts import HEALTHY

PANELS = (
    ("train_loss", "training loss", True),
    ("val_accuracy", "validation accuracy", False),
    ("fill", "codebook fill", False),
    ("perplexity", "perplexity", True),
)


def _subplots(nrows: int = 1, ncols: int = 1, **options: Any) -> tuple[Any, Any]:
    """A figure of its own canvas and its axes, as ``pyplot.subplots`` gives them, without
    pyplot's global state (no backend chosen, no figure registered)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=options.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **options)


def plot_history(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """PNG at ``path``: loss (log scale), accuracy, fill and perplexity per epoch."""
    path = Path(path)
    epochs = [row["epoch"] for row in history]
    fig, axes = _subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
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
    return path


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    curves = [[row.get(key) for row in r["history"]] for r in runs if r["history"]]
    if not curves:
        return [], []
    length = min(len(c) for c in curves)
    points = []
    for i in range(length):
        values = [c[i] for c in curves if c[i] is not None and math.isfinite(c[i])]
        points.append(sum(values) / len(values) if values else float("nan"))
    return list(range(1, length + 1)), points


def _by_method(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        grouped.setdefault(r["method"], []).append(r)
    return grouped


def plot_comparison(comparison: Any, directory: Path) -> list[Path]:
    """loss.png, health.png, accuracy.png and codes.png for a :class:`~stabq.compare.Comparison`."""
    grouped = _by_method(comparison.records)
    colour = {name: f"C{i % 10}" for i, name in enumerate(grouped)}  # one colour a method
    paths = []

    fig, ax = _subplots(figsize=(7, 4))
    for name, runs in grouped.items():
        epochs, loss = _mean_curve(runs, "train_loss")
        if epochs:
            ax.plot(epochs, loss, label=name, color=colour[name])
    ax.set(yscale="log", xlabel="epoch", ylabel="training loss (log)", title="loss per epoch")
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, directory / "loss.png"))

    fig, axes = _subplots(1, 2, figsize=(11, 4))
    for name, runs in grouped.items():
        if runs[0]["code_counts"]:
            for ax, key in zip(axes, ("fill", "perplexity"), strict=True):
                epochs, values = _mean_curve(runs, key)
                ax.plot(epochs, values, label=name, color=colour[name])
    axes[0].set(xlabel="epoch", ylabel="fill", title="codebook fill (validation)")
    axes[1].set(xlabel="epoch", ylabel="perplexity", yscale="log", title="perplexity (validation)")
    axes[1].axhline(comparison.num_classes, color="grey", ls="--", lw=1, label="classes")
    axes[1].legend(fontsize=7, ncol=2)
    paths.append(_save(fig, directory / "health.png"))

    paths.append(_save(plot_accuracy(comparison.rows), directory / "accuracy.png"))

    quantized = [(n, runs) for n, runs in grouped.items() if runs[0]["code_counts"]]
    if quantized:
        cols = min(4, len(quantized))
        rows_n = -(-len(quantized) // cols)
        fig, axes = _subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False)
        for ax, (name, runs) in zip(axes.flat, quantized, strict=False):
            counts = sorted(runs[0]["code_counts"][0], reverse=True)
            used = [c for c in counts if c > 0]
            ax.bar(range(len(used)), used, width=1.0)
            ax.set(yscale="log", title=f"{name}: {len(used)} codes used", xlabel="code rank")
        for ax in list(axes.flat)[len(quantized) :]:
            ax.axis("off")
        fig.suptitle("code frequencies on the test set (seed 0, first codebook)")
        paths.append(_save(fig, directory / "codes.png"))
    return paths


def plot_accuracy(rows: Sequence[dict[str, Any]]) -> Any:
    """A figure of two panels: each method's test accuracy (bars, ± sd over seeds), and its
    gap to the continuous reference with the 95% interval of the paired difference
    (:mod:`stabq.compare.paired`) around a zero line. Red: not ok or rescued."""
    fig, (ax, gaps) = _subplots(1, 2, figsize=(13, 4.2))
    names = [row["method"] for row in rows]
    means = [100 * row["accuracy"] for row in rows]
    sds = [100 * (row["accuracy_sd"] or 0.0) for row in rows]  # 1 seed: no bar
    colours = ["tab:blue" if row["verdict"] in HEALTHY else "tab:red" for row in rows]
    ax.bar(names, means, yerr=sds, color=colours, capsize=4)
    ax.set(ylabel="test accuracy %", title="accuracy over seeds (red: not ok or rescued)")
    gaps.axhline(0.0, color="grey", lw=1)
    for i, row in enumerate(rows):
        if row.get("gap") is None:  # the reference itself
            continue
        gap, low, high = row["gap"], row.get("gap_low"), row.get("gap_high")
        below, above = (0.0, 0.0) if low is None or high is None else (gap - low, high - gap)
        yerr = [[100 * below], [100 * above]]
        gaps.errorbar([i], [100 * gap], yerr=yerr, fmt="o", color=colours[i], capsize=4)
    _clip_to_healthy(gaps, rows)
    gaps.set_xticks(range(len(names)), names)
    gaps.set(
        ylabel="gap to continuous, points",
        title="gap to continuous, 95% interval of the paired difference",
    )
    for axis in (ax, gaps):
        axis.tick_params(axis="x", rotation=45)
    return fig


def _clip_to_healthy(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Keep the gap panel on the healthy methods' intervals: a failed method's interval
    (vq-ema's can span 130 points) is cut at the panel's edge, its end written there."""
    ends = [0.0]
    for row in rows:
        if row.get("gap") is not None and row["verdict"] in HEALTHY:
            ends += [100 * (row.get(k) if row.get(k) is not None else row["gap"])
                     for k in ("gap_low", "gap_high")]  # fmt: skip
    pad = max(1.0, 0.15 * (max(ends) - min(ends)))
    low, high = min(ends) - pad, max(ends) + pad
    for i, row in enumerate(rows):
        for key, edge, va in (("gap_low", low, "bottom"), ("gap_high", high, "top")):
            value = row.get(key)
            if value is not None and not low <= 100 * value <= high:
                ax.annotate(f"{100 * value:+.0f}", (i, edge), ha="center", va=va, fontsize=7)
    ax.set_ylim(low, high)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


__all__ = ["plot_accuracy", "plot_comparison", "plot_history"]
