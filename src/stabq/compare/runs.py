"""One run of a comparison (a method, a seed: trained, then judged on the test rows in one
pass on the model's device) and the per-method rows summarised from the runs."""

from __future__ import annotations

import math
import statistics
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stabq.compare.methods import METHODS, Method
from stabq.data.labeled import LabeledData
from stabq.errors import TrainingError
from stabq.health import verdicts as health
from stabq.health.usage import CodebookUsage
from stabq.integrations.tensorboard import epoch_writer
from stabq.model.classifier import BottleneckClassifier
from stabq.training import TrainConfig, evaluate_model, train
from stabq.training.batches import on_device


def fresh_encoder(encoder: str | nn.Module) -> str | nn.Module:
    """A name as it is; a module instance deep-copied with its parameters drawn anew (under
    the seed just set), so that every run starts from its own initialisation."""
    if not isinstance(encoder, nn.Module):
        return encoder
    copy = deepcopy(encoder)
    for module in copy.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return copy


def run_one(
    method: Method,
    seed: int,
    train_set: LabeledData,
    test_set: LabeledData,
    config: TrainConfig,
    encoder: str | nn.Module = "mlp",
    tensorboard: str | Path | None = None,
) -> dict[str, Any]:
    """Train one method with one seed; its figures, history and code frequencies.

    ``tensorboard``: this run's own events directory (rank 0 writes it).
    """
    torch.manual_seed(seed)
    model = BottleneckClassifier(
        train_set.input_shape, train_set.num_classes, method.quantizer,
        encoder=fresh_encoder(encoder), **method.options,
    )  # fmt: skip
    run_config = TrainConfig(**{**config.to_dict(), "seed": seed, "two_stage": method.two_stage})
    started = time.perf_counter()
    record: dict[str, Any] = {"method": method.name, "seed": seed, "diverged": False}
    try:
        with epoch_writer(tensorboard) as on_epoch:
            result = train(model, train_set, config=run_config, on_epoch=on_epoch)
        history, events = result.history, len(result.guard_events)
    except TrainingError as err:
        history, events = [], 0
        record.update(diverged=True, error=str(err))
    record["seconds"] = time.perf_counter() - started
    tx, ty = on_device(test_set.x, "cpu"), torch.from_numpy(test_set.y)
    figures = evaluate_model(model, tx, ty, keep_indices=True)  # on the model's device
    indices = figures.pop("indices")
    if not all(math.isfinite(figures[k]) for k in ("loss", "accuracy")):
        record["diverged"] = True
    record.update({f"test_{k}": v for k, v in figures.items()}, test_rows=len(test_set))
    record["max_loss"] = max((row["max_loss"] for row in history), default=float("inf"))
    if not math.isfinite(record["max_loss"]) or not all(
        bool(torch.isfinite(p).all()) for p in model.parameters()
    ):
        record["diverged"] = True
    record["guard_events"] = events
    record["history"] = history
    quantized = model.quantizer.codebook_size > 0
    record["code_counts"] = _code_counts(model.quantizer, indices) if quantized else []
    health.annotate(record, model, indices if quantized else None)
    return record


def _code_counts(quantizer: nn.Module, indices: torch.Tensor) -> list[list[int]]:
    """Per codebook, how often each code appears in ``indices``."""
    usage = CodebookUsage.for_quantizer(quantizer)
    usage.update(indices)
    return usage.counts.tolist()


def summarise(
    records: list[dict[str, Any]], num_classes: int, reference: str = "none"
) -> list[dict[str, Any]]:
    """One row per method (in first-seen order) from the per-run records."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    ref_runs = by_method.get(reference, [])
    ref_acc = statistics.mean(r["test_accuracy"] for r in ref_runs) if ref_runs else None
    rows = []
    for name, runs in by_method.items():
        accs = [r["test_accuracy"] for r in runs]
        quantized = METHODS[name].quantizer != "none" if name in METHODS else True
        row = {
            "method": name,
            "seeds": len(runs),
            "accuracy": statistics.mean(accs),
            "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None,  # 1 seed: none
            "gap": None
            if ref_acc is None or name == reference
            else statistics.mean(accs) - ref_acc,
            "usage": statistics.mean(r["test_usage"] for r in runs) if quantized else None,
            "perplexity": statistics.mean(r["test_perplexity"] for r in runs)
            if quantized
            else None,
            "dead_codes": None,  # set by health: EMA-horizon dead codes, None for grids
            "max_loss": max(r["max_loss"] for r in runs),
            "diverged": sum(r["diverged"] for r in runs),
            "rescued": sum(r["guard_events"] > 0 for r in runs),
            "seconds": statistics.mean(r["seconds"] for r in runs),
        }
        row.update(health.method_health(runs, num_classes, quantized))
        rows.append(row)
    return rows


def verdict(rows: list[dict[str, Any]], data_name: str) -> str:
    """One line: the method the data favours among the healthy, and why the others were not."""
    return health.favoured_line(rows, data_name)


__all__ = ["fresh_encoder", "run_one", "summarise", "verdict"]
