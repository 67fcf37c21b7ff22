"""Every method side by side on the same data: which bottleneck does this data favour?

``compare(data)`` trains each method for each seed with the same settings
(seeds in the same order for every method), evaluates on the held-out part,
and summarises per method: test accuracy (mean, spread), gap to the continuous
reference, codebook usage, perplexity, dead codes, the largest loss seen,
diverged and guard-rescued runs, time, and a health verdict with its reason
(ok / under-used / collapsed / diverged / rescued: the rules are in
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

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from stabq import health
from stabq.data import (
    LabeledData,
    load_data,
    require_classes,
    require_fit,
    train_val_split,
    with_classes,
)
from stabq.encoders import check_encoder, check_input_shape, encoder_name
from stabq.errors import ConfigError, TrainingError
from stabq.integrations.tensorboard import check_log_dir, epoch_writer, run_dir
from stabq.metrics import CodebookUsage
from stabq.model import BottleneckClassifier
from stabq.rows import as_labeled_data, on_device
from stabq.scenarios import EXPLODE_CONFIG, GUARDED, SCENARIOS, STABQ_PRESETS, explode_verdict
from stabq.training import TrainConfig, evaluate_model, train


@dataclass(frozen=True)
class Method:
    """One contender: a preset, its options, and how it is trained."""

    name: str
    quantizer: str
    options: dict[str, Any] = field(default_factory=dict)
    two_stage: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("none", "none"),
        Method("vq-ema", "vq-ema"),
        Method("vq", "vq"),
        Method("vq-1024", "vq", {"codebook_size": 1024}),
        Method("rvq", "rvq"),
        Method("fsq", "fsq"),
        Method("fsq-plain", "fsq-plain"),
        Method("gumbel", "gumbel"),
        Method("pq", "pq"),
        Method("fsq-2stage", "fsq", two_stage=True),
        Method("vq-2stage", "vq", two_stage=True),
        Method("simvq", "simvq"),
        Method("rfsq", "rfsq"),
        Method("lfq", "lfq"),
        Method("bsq", "bsq"),
        # the explode preset's baselines (stabq.scenarios): they reproduce the failure
        Method("vq-ema-sum", "vq-ema", {"commitment_reduction": "sum"}),
        Method(
            "vq-ema-tutorial",
            "vq-ema",
            {"commitment_reduction": "sum", "cluster_size_init": "zeros"},
        ),
    ]
}
NEWER = ["simvq", "rfsq", "lfq", "bsq"]  # the field's newer quantizers, in every preset
DEFAULT_METHODS = [
    "none", "vq-ema", "vq", "rvq", "fsq", "gumbel", "pq", "fsq-2stage", "vq-2stage", "vq-1024",
    *NEWER,
]  # fmt: skip
STRESS_METHODS = ["none", "vq-ema", "vq", "fsq", "fsq-plain", "rvq", *NEWER]
QUICK_METHODS = ["none", "vq-ema", "vq", "rvq", "fsq", "gumbel"]
PRESETS: dict[str, dict[str, Any]] = {
    # finishes in a few minutes on 2 cores for mnist1d
    "default": {"methods": DEFAULT_METHODS, "seeds": 2, "epochs": 40, "config": {}},
    # the first look (make demo): the baseline that collapses, the main repairs, 2 seeds
    "quick": {"methods": QUICK_METHODS, "seeds": 2, "epochs": 20, "config": {}},
    # vanilla VQ-EMA's failure: a high learning rate, 512 codes, no guards anywhere
    "stress": {
        "methods": STRESS_METHODS,
        "seeds": 3,
        "epochs": 20,
        "config": {"lr": 3e-2, "guards": False, "warmup_epochs": 0.0},
    },
    # the user's explosion (stabq.scenarios): each scenario's baseline with the stabq
    # presets under SGD momentum 0.9, lr 1e-2, guards off; then the baselines guarded
    "explode": {"methods": STABQ_PRESETS, "seeds": 3, "epochs": 10, "config": EXPLODE_CONFIG},
}


def resolve_methods(names: str | Sequence[str]) -> list[Method]:
    """Methods by name, in the order given: a list, or a comma-separated string as
    ``--methods`` takes it.

    Raises :class:`ConfigError` for no names, an empty entry (``"fsq,"``), a name given
    twice (it would count as another seed) or an unknown name (listing the known ones).

    Example::

        [m.quantizer for m in resolve_methods("fsq,vq-2stage")]  # ['fsq', 'vq']
    """
    given = names.split(",") if isinstance(names, str) else list(names)
    names = [n.strip() if isinstance(n, str) else n for n in given]
    shown = ",".join(map(str, given))
    if not names or any(n == "" for n in names):
        raise ConfigError(
            f"--methods {shown!r}: an empty method name; give comma-separated names from: "
            f"{', '.join(METHODS)}"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"--methods {shown}: {', '.join(twice)} named more than once (use --seeds for "
            "more runs of a method)"
        )
    unknown = [str(n) for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(
            f"--methods {shown}: unknown {', '.join(unknown)}; allowed: {', '.join(METHODS)}"
        )
    return [METHODS[n] for n in names]


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


@dataclass
class Comparison:
    """What :func:`compare` returns: per-run records, per-method rows and the verdict."""

    data: str
    preset: str
    num_classes: int
    records: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    verdict: str
    seconds: float
    settings: dict[str, Any]


Data = str | LabeledData | Dataset | tuple[Any, Any]  # a name or file, or what train takes
RUN_SET = ("seed", "two_stage", "epochs", "progress")  # set by compare for each run


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
) -> Comparison:
    """Train every method on ``data`` for ``seeds`` seeds and compare them.

    Args:
        data: a built-in name or a file (as ``--data``), or what :func:`stabq.train`
            takes: arrays ``(x, y)``, :class:`~stabq.data.LabeledData` or a map-style
            torch ``Dataset``.
        methods: names of :data:`METHODS` (a list or ``"a,b"``); default the preset's.
        seeds: runs per method (seeds 0, 1, ...); default the preset's.
        epochs: epochs per run; default the preset's.
        preset: ``default``, ``stress`` or ``explode`` (:data:`PRESETS`): methods, seeds,
            epochs and training options unless given.
        on_run: called with each run's record as it ends.
        progress: progress bars (None: when the output is a terminal).
        encoder: every method's encoder (:mod:`stabq.encoders`; a module instance is
            copied and re-initialised for every run).
        test_data: the test set, as ``data``; default a built-in's test part, else a
            stratified 20% of ``data`` (fixed seed).
        tensorboard: a directory for TensorBoard events (needs ``stabq[tensorboard]``),
            one run per method and seed, ``tensorboard/<method>/seed-<k>``.
        options: training options (:class:`~stabq.TrainConfig` fields such as ``lr``,
            ``batch_size``, ``optimizer``), over the preset's; ``explode``'s scenarios
            keep their own optimiser, rate and guards, the failure they reproduce.
    Returns:
        A :class:`Comparison`: per-run records, per-method rows and the verdict line.
    Raises:
        ConfigError: an unknown preset, method or option, a method named twice, seeds < 1.
        DataError: data stabq cannot train on.

    Example::

        result = compare("mnist1d", methods="none,fsq,vq", seeds=1, epochs=5, options={"lr": 1e-3})
        print(result.verdict)
    """
    chosen, seeds, config = _plan(preset, methods, seeds, epochs, progress, options)
    check_encoder(encoder)
    if tensorboard is not None:
        check_log_dir(tensorboard)
    train_set, test_set = _train_test(data, test_data)
    check_input_shape(encoder, train_set.input_shape, train_set.source)
    require_fit(test_set, train_set.input_shape, model="the training data")
    name = data if isinstance(data, str) else train_set.source
    settings = {"seeds": seeds, "encoder": encoder_name(encoder), **config.to_dict()}
    started = time.perf_counter()
    if preset == "explode":
        ordered, rows, line = _explode(chosen, seeds, train_set, test_set, config, encoder, on_run)
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


def planned_runs(
    preset: str = "default", methods: str | Sequence[str] | None = None, seeds: int | None = None
) -> int:
    """How many runs :func:`compare` trains for these arguments (``explode`` trains each
    scenario's baseline twice more: guards off, then on). Raises as compare does."""
    chosen, seeds, _ = _plan(preset, methods, seeds, None, None, None)
    extra = 2 * len(SCENARIOS) if preset == "explode" else 0
    return (len(chosen) + extra) * seeds


def _plan(
    preset: str,
    methods: str | Sequence[str] | None,
    seeds: int | None,
    epochs: int | None,
    progress: bool | None,
    options: Mapping[str, Any] | None,
) -> tuple[list[Method], int, TrainConfig]:
    """The methods, seeds and training options of a comparison, checked."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: allowed: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    chosen = resolve_methods(spec["methods"] if methods is None else methods)
    seeds = spec["seeds"] if seeds is None else seeds
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"--seeds {seeds!r}: allowed is an integer >= 1")
    options = dict(options or {})
    taken = sorted(set(options) & set(RUN_SET))
    if taken:
        raise ConfigError(
            f"--option {taken[0]}: compare sets it for each run (seeds run 0, 1, ...; "
            "two-stage is a method; epochs and progress have options of their own)"
        )
    epochs = spec["epochs"] if epochs is None else epochs
    run = {**spec["config"], **options, "epochs": epochs, "progress": progress}
    return chosen, seeds, TrainConfig.from_dict(run)


def _explode(
    chosen: list[Method],
    seeds: int,
    train_set: LabeledData,
    test_set: LabeledData,
    config: TrainConfig,
    encoder: str | nn.Module,
    on_run: Callable[[dict[str, Any]], None] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Each scenario as its own comparison (its baseline first, guards off), then its
    baseline guarded. A run is trained once per training options and seed: scenarios
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
    train_set, test_set = train_val_split(full, 0.2, seed=0)
    return train_set, test_set


__all__ = ["METHODS", "PRESETS", "Comparison", "Method", "compare"]
