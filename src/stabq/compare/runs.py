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

from stabq.compare import paired
from stabq.compare.methods import METHODS, Method
from stabq.data.ids import vocab_of
from stabq.data.labeled import LabeledData
from stabq.errors import TrainingError
from stabq.health import verdicts as health
from stabq.health.usage import CodebookUsage
from stabq.integrations.tensorboard import epoch_writer
from stabq.model.classifier import BottleneckClassifier
from stabq.quantizers.registry import preset_caution
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

    ``tensorboard``: this run's own events directory (rank 0 writes it). ``test_correct``
    says which test rows the model got right (:mod:`stabq.compare.paired`).
    """
    torch.manual_seed(seed)
    model = BottleneckClassifier(
        train_set.input_shape, train_set.num_classes, method.quantizer,
        encoder=fresh_encoder(encoder), vocab_size=vocab_of(train_set), **method.options,
    )  # fmt: skip
    run_config = TrainConfig(**{**config.to_dict(), "seed": seed, "two_stage": method.two_stage})
    started = time.perf_counter()
    record: dict[str, Any] = {"method": method.name, "seed": seed, "diverged": False}
    try:
        with epoch_writer(tensorboard) as on_epoch:
            result = train(model, train_set, config=run_config, on_epoch=on_epoch)
        history, events = result.history, len(result.guard_events)
        record["best_epoch"] = result.best_epoch
    except TrainingError as err:
        history, events = [], 0
        record.update(diverged=True, error=str(err))
    record["seconds"] = time.perf_counter() - started
    record["epochs"] = len(history)  # trained (with patience: until it stopped improving)
    tx, ty = on_device(test_set.x, "cpu"), torch.from_numpy(test_set.y)
    figures = evaluate_model(model, tx, ty, keep_indices=True, keep_predictions=True)
    indices = figures.pop("indices")
    record["test_correct"] = (figures.pop("predictions") == ty).numpy()  # see compare.paired
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
    """One row per method (in first-seen order) from the per-run records.

    Beside the means and the health verdict, each row carries paired differences over the
    seeds both methods ran (:mod:`stabq.compare.paired`, fractions, not points): ``gap``
    against ``reference`` with its 95% interval ``gap_low``, ``gap_high``; ``to_best``,
    ``to_best_low``, ``to_best_high`` against the best healthy method
    (:func:`~stabq.health.verdicts.favoured`; None in the best's own row);
    ``separate_seeds``, the seeds in all that would separate the method from the best,
    and ``needs_rows``, True when the method cannot be told from the best and the test
    rows alone keep it so (more test rows, not more seeds, would be needed). The
    intervals, ``separate_seeds`` and ``needs_rows`` are None for runs that kept no
    ``test_correct``. ``caution`` is the registry's condition under which not to use the
    method's preset (:func:`~stabq.quantizers.registry.preset_caution`), or None.
    """
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for name, runs in by_method.items():
        accs = [r["test_accuracy"] for r in runs]
        quantized = METHODS[name].quantizer != "none" if name in METHODS else True
        row = {
            "method": name,
            "seeds": len(runs),
            "accuracy": statistics.mean(accs),
            "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None,  # 1 seed: none
            **_paired(runs, by_method.get(reference) if name != reference else None, "gap"),
            **dict.fromkeys(("to_best", "to_best_low", "to_best_high", "separate_seeds")),
            "needs_rows": None,
            "usage": statistics.mean(r["test_usage"] for r in runs) if quantized else None,
            "perplexity": statistics.mean(r["test_perplexity"] for r in runs)
            if quantized
            else None,
            "dead_codes": None,  # set by health: EMA-horizon dead codes, None for grids
            "max_loss": max(r["max_loss"] for r in runs),
            "diverged": sum(r["diverged"] for r in runs),
            "rescued": sum(r["guard_events"] > 0 for r in runs),
            "seconds": statistics.mean(r["seconds"] for r in runs),
            "epochs": statistics.median(r.get("epochs", len(r.get("history", []))) for r in runs),
        }
        row.update(health.method_health(runs, num_classes, quantized))
        row["caution"] = preset_caution(METHODS[name].quantizer) if name in METHODS else None
        rows.append(row)
    best = health.favoured(rows, reference)
    for row in rows if best is not None else []:
        if row is not best:
            row.update(_paired(by_method[row["method"]], by_method[best["method"]], "to_best"))
    return rows


def _paired(
    runs: list[dict[str, Any]], against: list[dict[str, Any]] | None, key: str
) -> dict[str, Any]:
    """``key``, ``key_low``, ``key_high`` (and for ``to_best`` the seeds and rows that
    would separate): ``runs`` against ``against``, paired over their shared seeds."""
    d, pair = paired.paired_runs(runs, against) if against else (None, None)
    row: dict[str, Any] = {key: d, f"{key}_low": None, f"{key}_high": None}
    if key == "to_best":
        row.update(separate_seeds=None, needs_rows=None)
    if pair is None:
        return row
    row.update({key: pair.difference, f"{key}_low": pair.low, f"{key}_high": pair.high})
    if key == "to_best":
        row["separate_seeds"] = paired.seeds_to_separate(pair)
        row["needs_rows"] = paired.rows_decide(pair) if pair.cannot_tell else None
    return row


def verdict(rows: list[dict[str, Any]], data_name: str, reference: str = "none") -> str:
    """One line: the method the data favours among the healthy, which others the data
    cannot tell from it, and why the others were not considered."""
    best = health.favoured(rows, reference)
    detail = "" if best is None else within_uncertainty(rows, best, reference)
    return health.favoured_line(rows, data_name, reference, detail)


def within_uncertainty(
    rows: list[dict[str, Any]], best: dict[str, Any], reference: str = "none"
) -> str:
    """Words for the verdict line: the healthy methods whose paired difference from the
    ``best`` has a 95% interval containing 0, and what would separate them; that every
    other one is separated, when so; nothing when a row has no interval."""
    others = [
        r for r in rows
        if r["method"] != reference and r["verdict"] in health.HEALTHY and r is not best
    ]  # fmt: skip
    if not others or any(r.get("to_best_low") is None for r in others):
        return ""
    seeds = best["seeds"]
    over = f"over {seeds} seeds" if seeds > 1 else "on 1 seed"
    note = "; with 1 seed it covers the test rows only, not training randomness"
    note = note if seeds == 1 else ""
    close = [r for r in others if r["to_best_low"] <= 0.0 <= r["to_best_high"]]
    if not close:
        who = others[0]["method"] if len(others) == 1 else f"the other {len(others)}"
        verb = "is" if len(others) == 1 else "are"
        return (
            f"{who} {verb} below it beyond the uncertainty {over} "
            f"(95% interval of the paired difference excludes 0{note})"
        )
    verb = "is" if len(close) == 1 else "are"
    words = [
        f"{_names([r['method'] for r in close])} {verb} within the uncertainty of "
        f"{best['method']} {over} (95% interval of the paired difference contains 0{note})"
    ]
    return "; ".join(words + (_what_would_separate(close) if seeds > 1 else []))


def _what_would_separate(close: list[dict[str, Any]]) -> list[str]:
    """Per group of methods: the seeds that would separate them from the best, or that
    more test rows would be needed, or more than :data:`~stabq.compare.paired.MOST_SEEDS`
    seeds, or that they do not differ at all."""
    same = [r["method"] for r in close if r["to_best_low"] == r["to_best_high"] == 0.0]
    counted = [r for r in close if r["separate_seeds"] is not None]
    left = [r for r in close if r["separate_seeds"] is None and r["method"] not in same]
    rows_only = [r["method"] for r in left if r["needs_rows"]]
    beyond = [r["method"] for r in left if not r["needs_rows"]]
    words = []
    if counted:
        counted.sort(key=lambda r: r["separate_seeds"])
        first, *rest = counted
        words.append(
            f"about {first['separate_seeds']} seeds would separate {first['method']}"
            + "".join(f", {r['separate_seeds']} {r['method']}" for r in rest)
        )
    if rows_only:
        words.append(f"for {_names(rows_only)} more test rows, not more seeds, would be needed")
    if beyond:
        words.append(f"for {_names(beyond)} even {paired.MOST_SEEDS} seeds would not do")
    if same:
        words.append(f"{_names(same)} {'does' if len(same) == 1 else 'do'} not differ at all")
    return words


def _names(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


__all__ = ["fresh_encoder", "run_one", "summarise", "verdict", "within_uncertainty"]
