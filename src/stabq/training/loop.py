"""The training loop: one function, blind to which quantizer the model holds.

It only uses the Quantizer interface: ``quantization_enabled`` (two-stage),
``init_from_features`` (seeding codebooks between the stages),
``set_progress`` (Gumbel's temperature), ``codebook_size`` /
``num_codebooks`` (usage figures) and the auxiliary loss each forward returns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from stabq import distributed
from stabq.data.labeled import (
    LabeledData,
    require_classes,
    require_fit,
    with_classes,
)  # fmt: skip
from stabq.data.rows import scan, view_split
from stabq.errors import ConfigError, StabqError, TrainingError
from stabq.files import AppendLog
from stabq.health.monitor import CollapseMonitor
from stabq.model.classifier import BottleneckClassifier
from stabq.training.batches import as_labeled_data, on_device
from stabq.training.compiling import compile_module
from stabq.training.config import TrainConfig, TrainResult
from stabq.training.devices import check_device
from stabq.training.epochs import BatchTransform, Epochs, Rows, build_optimizer
from stabq.training.evaluation import (
    evaluate_model,
    reference_figures,
)
from stabq.training.guard import StabilityGuard
from stabq.training.resume import Checkpointer


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; a device that is not here is a
    :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name)


def train(
    model: BottleneckClassifier,
    train_data: LabeledData | Dataset | tuple[Any, Any],
    val: LabeledData | Dataset | tuple[Any, Any] | None = None,
    config: TrainConfig | None = None,
    *,
    metrics_path: str | Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    batch_transform: BatchTransform | None = None,
    fit_feature_stats: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    run_info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a `BottleneckClassifier` with the stability guards, and return it with its history.

    The model's inputs are standardised with statistics of `train_data` (token ids are
    not); each epoch
    trains on shuffled batches, then measures the validation loss, accuracy and
    codebook figures. Rows of a Dataset or of a memory-mapped `x`
    (`np.load(..., mmap_mode="r")`) are never all loaded: each batch is read when its
    step comes, so memory is bounded by the batch, and the run equals the one on the
    same arrays in memory, bit for bit. Under torch.distributed (`torchrun`) every rank
    passes the same data and config: the model is wrapped in DistributedDataParallel,
    each step's global batch of `config.batch_size` rows is split over the ranks, the
    guard decides on figures agreed over them, only rank 0 writes files or shows
    progress, and every rank returns the same history.

    Args:
        model: the model to train, in place (its `num_classes` and input shape must fit
            the data).
        train_data: arrays `(x, y)` (`x (n, *input_shape)` finite numbers, `y (n,)`
            integer or string labels, the classes their sorted distinct values), a
            `stabq.data.LabeledData`, or a map-style torch `Dataset` whose item `i` is
            `(x_i, y_i)`.
        val: validation data in the same forms (labels matched to the training
            classes by name); default None: a stratified `config.val_fraction` of
            `train_data`.
        config: the training options; default None: `TrainConfig()`.
        metrics_path: a file to append each epoch's row to, as JSON lines (flushed at
            once); None: none.
        on_epoch: called with each epoch's row (`TrainResult.history` has them all).
        batch_transform: called as `batch_transform(step, x, y)` on each batch, returning
            the `(x, y)` to use: to augment or alter batches.
        fit_feature_stats: set the model's input standardisation from `train_data`
            (default True); False keeps the statistics it has.
        checkpoint_dir: a directory to write a checkpoint to before the first epoch and
            after each one; None: no checkpoints.
        resume: continue from the checkpoint in `checkpoint_dir`: pass the same model
            architecture, data and config (they are checked), and the run ends exactly
            as if it had never stopped.
        run_info: a JSON-serialisable dict stored in the checkpoints.

    Returns:
        A `TrainResult`: the model (in eval mode), its per-epoch history, the guard's
            events and the time taken.

    Raises:
        ConfigError: a device this machine lacks, or a `metrics_path` that cannot be
            written.
        DataError: data stabq cannot train on (non-finite values, a single class, rows
            whose shape or classes do not fit the model).
        TrainingError: training diverged and the guards could not recover it, or no
            batch of an epoch could be used.
        CheckpointError: a checkpoint that cannot be written, or `resume` without a
            matching checkpoint.

    Examples:
        >>> import numpy as np, stabq
        >>> x = np.random.default_rng(0).normal(size=(200, 8)).astype("float32")
        >>> y = (x[:, 0] > 0).astype("int64")
        >>> model = stabq.BottleneckClassifier(8, 2, "fsq", hidden=32, bottleneck_dim=16)
        >>> config = stabq.TrainConfig(epochs=2, batch_size=64, progress=False)
        >>> result = stabq.train(model, (x, y), config=config)
        >>> [row["epoch"] for row in result.history], 0 <= result.final["val_accuracy"] <= 1
        ([1, 2], True)
    """
    config = config or TrainConfig()
    data, val_data = _checked_parts(model, train_data, val, config)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    rows = _rows_on(device, model, data, val_data, config, fit_feature_stats)
    optimizer = build_optimizer(list(model.parameters()), config)
    guard = StabilityGuard.from_config(model, optimizer, config)
    head = slice(0, config.batch_size)
    guard.prime(*reference_figures(model, rows.x[head], rows.y[head], rows.vx, rows.vy))
    guard.monitor = monitor = _attach_monitor(model)  # its state is the guard's, in checkpoints
    main = distributed.is_main()  # rank 0 alone writes the log and the checkpoints
    saver = Checkpointer.open(checkpoint_dir, resume, model, config, (data, val_data), writer=main)
    epochs = Epochs(model, config, rows, guard, optimizer, gen, device, batch_transform)
    result = epochs.restore(saver.resumed if saver else None)
    started = time.perf_counter() - epochs.seconds_before
    log = None  # a resumed run's log starts again from the history restored
    if metrics_path and main:
        lines = [json.dumps(r) for r in result.history] if epochs.resumed else None
        log = AppendLog(metrics_path, ConfigError, "the metrics", lines)
    try:
        if saver and main and not epochs.resumed:
            saver.save(0, model, epochs.optimizer, guard, gen, [], run_info, epochs.scaler)
        for row in epochs.run(show=config.progress if main else False):
            if log is not None:
                log.write(json.dumps(row))
            if saver and main:
                saver.save(row["epoch"], model, epochs.optimizer, guard, gen, result.history,
                           run_info, epochs.scaler)  # fmt: skip
            if on_epoch is not None:
                on_epoch(row)
    except TrainingError:
        if saver and main:  # a diverged run would diverge again when resumed: nothing to keep
            saver.discard()
        raise
    finally:
        if monitor is not None:
            monitor.detach()
        if log is not None:
            log.close()
    model.eval()
    result.guard_events = list(guard.events)
    result.seconds = time.perf_counter() - started
    return result


def _checked_parts(
    model: BottleneckClassifier, train_data: Any, val: Any, config: TrainConfig
) -> tuple[LabeledData, LabeledData]:
    """The training and validation parts, each checked to fit ``model``; the validation
    part is a stratified ``config.val_fraction`` of the training data unless given."""
    data = require_classes(as_labeled_data(train_data))
    if val is None:
        data, val_data = view_split(data, config.val_fraction, config.seed)  # rows held once
    else:  # class ids follow the training data's classes, by name
        val_data = with_classes(as_labeled_data(val), data.classes)
    for part in (data, val_data):
        require_fit(part, model.input_shape, model.num_classes, vocab_size=model.vocab_size)
    return data, val_data


def _rows_on(
    device: torch.device,
    model: BottleneckClassifier,
    data: LabeledData,
    val_data: LabeledData,
    config: TrainConfig,
    fit_feature_stats: bool,
) -> Rows:
    """The model standardised for ``data`` (unless told not to) and moved to ``device``
    (compiled if asked), and the rows it trains and validates on, there."""
    if fit_feature_stats and model.vocab_size is None:  # token ids are never standardised
        stats = scan(data, model.stats_shape)  # one pass of chunks for rows in their file
        model.set_feature_stats(torch.from_numpy(stats.mean), torch.from_numpy(stats.std))
    model.to(device)
    if config.compile:
        compile_module(model.quantizer)
    x = on_device(data.x, device)  # a tensor, or a reader of each batch's rows
    y = torch.from_numpy(data.y).to(device)
    vx = on_device(val_data.x, device, shard=True)
    vy = distributed.shard_rows(torch.from_numpy(val_data.y).to(device))
    return Rows(x, y, vx, vy)


def _attach_monitor(model: BottleneckClassifier) -> CollapseMonitor | None:
    """A silent :class:`CollapseMonitor` on the quantizer's training forwards, or None.

    None for a quantizer without codes to watch, and under torch.distributed: each rank
    sees its own share of the rows, and every rank must return the same history.
    The hook draws no random number and changes no tensor: the run is as without it.
    """
    if distributed.is_distributed():
        return None
    try:
        return CollapseMonitor(model.quantizer, warn=False, training_only=True)
    except StabqError:
        return None


__all__ = ["BatchTransform", "build_optimizer", "evaluate_model", "resolve_device", "train"]
