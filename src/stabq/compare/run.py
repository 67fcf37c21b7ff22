"""Every method side by side on the same data: which bottleneck does this data favour?

``compare(data)`` trains each method for each seed with the same settings
(seeds in the same order for every method), evaluates on the held-out part,
and summarises per method: test accuracy (mean, spread), gap to the continuous
reference and difference to the best healthy method (paired over seeds and test rows,
with 95% intervals: :mod:`stabq.compare.paired`), codebook usage, perplexity, dead
codes, the largest loss seen,
diverged and guard-rescued runs, time, and a health verdict with its reason
(ok / rescued / under-used / collapsed / stalled / diverged: the rules are in
:mod:`stabq.health`).

The ``stress`` preset reproduces the conditions under which vanilla VQ-EMA
fails (Adam-style lr 3e-2, 512 codes, decay 0.99) with the guards off for
every method, so a failure shows instead of being rescued.

The ``explode`` preset reproduces the user's losses of 1e10 and more: one
comparison per scenario of :mod:`stabq.scenarios` (its baseline and the chosen
methods, guards off), then each baseline again with the guards on. Records and
rows carry ``scenario`` and ``guards``; the verdict has a line per scenario.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from stabq.compare.methods import Method, plan, planned_runs, resolve_methods
from stabq.compare.runs import run_one, summarise, verdict
from stabq.compare.scenarios import GUARDED, SCENARIOS, explode_verdict
from stabq.data.ids import vocab_of
from stabq.data.labeled import (
    LabeledData,
    require_classes,
    require_fit,
    with_classes,
)
from stabq.data.load import load_data
from stabq.data.rows import view_split
from stabq.integrations.tensorboard import check_log_dir, run_dir
from stabq.model.encoders import check_encoder, check_input_shape, encoder_name
from stabq.training.batches import as_labeled_data
from stabq.training.config import TrainConfig


@dataclass
class Comparison:
    """What `stabq.compare` returns: per-run records, per-method rows and the verdict.

    Attributes:
        data: the data's name (a built-in's or a file's, or the source of arrays).
        preset: the preset compared under.
        num_classes: classes in the training data.
        records: one dict a run: `method`, `seed`, `test_accuracy`, `test_usage`,
            `test_perplexity`, `max_loss`, `diverged`, `guard_events`, `history`, ...
        rows: one dict a method (a scenario's method for `explode`): `accuracy`,
            `accuracy_sd`, `gap` to the continuous reference and its interval, `usage`,
            `fill`, `perplexity`, `dead_codes`, `verdict`, `reason`, ...
        verdict: one line: the method the data favours among the healthy ones, and why.
        seconds: the comparison's time.
        settings: the seeds, the encoder and the training options every run used.

    Examples:
        >>> import numpy as np, stabq
        >>> x = np.random.default_rng(1).normal(size=(80, 4)).astype("float32")
        >>> result = stabq.compare((x, (x[:, 1] > 0).astype("int64")), methods="fsq",
        ...                        seeds=1, epochs=1, progress=False)
        >>> result.preset, result.num_classes, result.settings["seeds"]
        ('default', 2, 1)
    """

    data: str
    preset: str
    num_classes: int
    records: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    verdict: str
    seconds: float
    settings: dict[str, Any]


Data = str | LabeledData | Dataset | tuple[Any, Any]  # a name or file, or what train takes


def compare(
    data: Data = "mnist1d",
    methods: str | Sequence[str] | None = None,
    seeds: int | None = None,
    epochs: int | None = None,
    preset: str = "default",
    on_run: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
    *,
    encoder: str | nn.Module = "mlp",
    test_data: Data | None = None,
    tensorboard: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
    on_start: Callable[[int], None] | None = None,
    patience: int | None = None,
) -> Comparison:
    """Train every method on the same data for each seed, and say which bottleneck it favours.

    Each method (a preset and how it is trained) is trained for each seed with the same
    settings, seeds in the same order for every method, and evaluated on the held-out
    test part. Each method's row gives its test accuracy (mean, spread), the gap to the
    continuous reference (`none`) and the difference to the best healthy method (paired
    over seeds and test rows, with 95% intervals), codebook usage, perplexity, dead
    codes, the largest loss seen, diverged and guard-rescued runs, time, and a health
    verdict with its reason (ok, rescued, under-used, collapsed, stalled or diverged).

    The presets: `default` (14 methods, 2 seeds, each run until its validation accuracy
    stops improving, at most 150 epochs), `quick` (6 methods, the same way), `stress`
    (vanilla VQ-EMA's failure: lr 3e-2, guards off, 20 epochs, 3 seeds) and `explode`
    (the losses of 1e10 and more: each scenario's baseline and the chosen methods under
    SGD with the guards off, then each baseline again guarded; rows carry `scenario` and
    `guards`, the verdict has a line per scenario).

    Args:
        data: a built-in name (`mnist1d`, `digits`, `synthetic`) or a data file (`.npz`,
            `.pt`, `.safetensors`, `.csv`, `.parquet`, `.npy`), or what `stabq.train`
            takes: arrays `(x, y)`, a `stabq.data.LabeledData` or a map-style torch
            `Dataset`.
        methods: method names, a list or a comma-separated string (`"none,fsq,vq"`);
            default None: the preset's. The names: the presets of `build_quantizer`,
            `fsq-2stage` and `vq-2stage` (two-stage training), `vq-1024`, and the
            explode preset's baselines `vq-ema-sum` and `vq-ema-tutorial`.
        seeds: runs per method (seeds 0, 1, ...), an integer >= 1; default the preset's.
        epochs: epochs per run, a fixed length; with `patience`, the ceiling. Default
            None: the preset's.
        preset: `"default"`, `"quick"`, `"stress"` or `"explode"`: the methods, seeds,
            epochs and training options not given.
        on_run: called with each run's record as it ends.
        progress: progress bars (None: when the output is a terminal).
        encoder: every method's encoder: `"mlp"`, `"cnn1d"`, `"cnn2d"`,
            `"package.module:factory"` or a module instance (copied and re-initialised
            for every run).
        test_data: the test set, in the forms of `data`; default None: a built-in's test
            part, else a stratified 20% of `data` (fixed seed).
        tensorboard: a directory for TensorBoard events (needs `stabq[tensorboard]`),
            one run per method and seed, `tensorboard/<method>/seed-<k>`.
        options: training options (`TrainConfig` fields such as `lr`, `batch_size`,
            `optimizer`) over the preset's; `explode`'s scenarios keep their own
            optimiser, rate and guards, the failure they reproduce.
        on_start: called with the number of runs once the data is loaded and checked,
            before the first run.
        patience: train each run until its validation accuracy has not improved for this
            many epochs (after two 10x rate drops), then go back to its best epoch.

    Returns:
        A `Comparison`: per-run records, per-method rows and the verdict line.

    Raises:
        ConfigError: an unknown preset, method or option, a method named twice, fewer
            than 1 seed, an option compare sets for each run (`seed`, `epochs`, ...), or a
            TensorBoard directory that cannot be written.
        DataError: data stabq cannot train on, or test data that does not fit it.

    Examples:
        >>> import numpy as np, stabq
        >>> x = np.random.default_rng(0).normal(size=(100, 4)).astype("float32")
        >>> y = (x[:, 0] > 0).astype("int64")
        >>> result = stabq.compare((x, y), methods="none,fsq", seeds=1, epochs=1, progress=False)
        >>> [row["method"] for row in result.rows], len(result.records)
        (['none', 'fsq'], 2)
        >>> result.verdict.startswith("arrays")
        True
    """
    chosen, seeds, config = plan(preset, methods, seeds, epochs, progress, options, patience)
    check_encoder(encoder)
    if tensorboard is not None:
        check_log_dir(tensorboard)
    train_set, test_set = _train_test(data, test_data)
    check_input_shape(encoder, train_set.input_shape, train_set.source)
    vocab = vocab_of(train_set)  # token ids: the test ids must lie in the training vocabulary
    require_fit(test_set, train_set.input_shape, model="the training data", vocab_size=vocab)
    name = data if isinstance(data, str) else train_set.source
    settings = {"seeds": seeds, "encoder": encoder_name(encoder), **config.to_dict()}
    if on_start is not None:
        on_start(planned_runs(preset, [m.name for m in chosen], seeds))
    started = time.perf_counter()
    if preset == "explode":
        ordered, rows, line = run_explode(
            chosen, seeds, train_set, test_set, config, encoder, on_run
        )
    else:
        records = []
        for seed in range(seeds):  # seeds outermost: every method sees seed s before s + 1
            for method in chosen:
                events = None if tensorboard is None else run_dir(tensorboard, method.name, seed)
                record = run_one(method, seed, train_set, test_set, config, encoder, events)
                records.append(record)
                if on_run is not None:
                    on_run(record)
        ordered = sorted(records, key=lambda r: [m.name for m in chosen].index(r["method"]))
        rows = summarise(ordered, train_set.num_classes)
        line = verdict(rows, name)
    seconds = time.perf_counter() - started
    return Comparison(name, preset, train_set.num_classes, ordered, rows, line, seconds, settings)


def run_explode(
    chosen: list[Method],
    seeds: int,
    train_set: LabeledData,
    test_set: LabeledData,
    config: TrainConfig,
    encoder: str | nn.Module,
    on_run: Callable[[dict[str, Any]], None] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """The explode preset: each scenario as its own comparison (its baseline first, guards
    off), then its baseline guarded. A run is trained once per training options and seed: scenarios
    sharing their options share the chosen methods' runs (the same run, bit for bit)."""
    done: dict[tuple[str, int, str], dict[str, Any]] = {}
    records, rows = [], []
    for scenario in SCENARIOS:
        base = TrainConfig(**{**config.to_dict(), **scenario.config})
        parts = [(resolve_methods([scenario.baseline]) + chosen, base, False)]
        guarded = TrainConfig(**{**base.to_dict(), **GUARDED})
        parts.append((resolve_methods([scenario.baseline]), guarded, True))
        for methods, run_config, guards in parts:
            part = []
            for seed in range(seeds):
                for method in methods:
                    key = (method.name, seed, repr(sorted(run_config.to_dict().items())))
                    if key not in done:
                        done[key] = run_one(method, seed, train_set, test_set, run_config, encoder)
                        if on_run is not None:
                            on_run(done[key])
                    part.append({**done[key], "scenario": scenario.name, "guards": guards})
            part.sort(key=lambda r: [m.name for m in methods].index(r["method"]))
            records += part
            for row in summarise(part, train_set.num_classes):
                rows.append({"scenario": scenario.name, "guards": guards, **row})
    return records, rows, explode_verdict(rows)


def _train_test(data: Data, test_data: Data | None) -> tuple[LabeledData, LabeledData]:
    """The given test data; else built-ins come split and the rest is split 80/20 here
    (stratified, fixed seed)."""
    named = isinstance(data, str)
    full = require_classes(load_data(data, "train") if named else as_labeled_data(data))
    if test_data is not None:
        if isinstance(test_data, str):
            return full, load_data(test_data, "test", classes=full.classes)
        return full, with_classes(as_labeled_data(test_data), full.classes)
    if named and full.source.endswith(":train"):
        return full, load_data(data, "test", classes=full.classes)
    train_set, test_set = view_split(full, 0.2, seed=0)  # rows held once, as in train
    return train_set, test_set


__all__ = ["Comparison", "compare"]
