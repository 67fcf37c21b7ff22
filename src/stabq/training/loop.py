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

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from stabq import distributed
from stabq.data.labeled import (
    LabeledData,
    require_classes,
    require_fit,
    train_val_split,
    with_classes,
)  # fmt: skip
from stabq.data.rows import scan
from stabq.errors import ConfigError, StabqError, TrainingError
from stabq.files import AppendLog
from stabq.health.monitor import CollapseMonitor
from stabq.model.classifier import BottleneckClassifier
from stabq.training.batches import as_labeled_data, on_device
from stabq.training.compiling import compile_module
from stabq.training.config import TrainConfig, TrainResult
from stabq.training.devices import check_device
from stabq.training.evaluation import (
    HEALTH_FIGURES,
    Features,
    _reference_figures,
    _standardized,
    evaluate_model,
)
from stabq.training.guard import StabilityGuard
from stabq.training.resume import Checkpointer
from stabq.training.schedule import cosine_with_warmup, linear_ramp

BatchTransform = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
    """Train ``model`` on ``train_data`` and return the model with its history.

    ``train_data`` and ``val``: arrays ``(x, y)``, :class:`LabeledData`, or a map-style
    torch ``Dataset`` (item ``i`` -> ``(x_i, y_i)``). The rows of a Dataset or of a
    memory-mapped ``x`` (``np.load(..., mmap_mode="r")``) are never all loaded: each
    batch is read when its step comes (:mod:`stabq.rows`), so memory is bounded by the
    batch, and the run equals the run on the same arrays held in memory, bit for bit.

    ``val`` defaults to a stratified ``config.val_fraction`` of the training
    data. Each epoch's figures go to ``metrics_path`` (JSON lines, appended and
    flushed) and to ``on_epoch``; a row's ``alerts`` are the messages of the
    :class:`~stabq.CollapseMonitor` alerts (mechanisms included, see
    :mod:`stabq.mechanisms`) raised in that epoch's training steps, and a guard
    event's reason ends with ``(while: ...)`` naming those that held when it
    happened. ``batch_transform(step, x, y)`` may alter
    each batch before it is used (tests poison batches with it).

    Under torch.distributed (e.g. ``torchrun``) every rank passes the same data
    and config: the model is wrapped in DistributedDataParallel, each step's
    global batch of ``config.batch_size`` rows is split over the ranks
    (:func:`stabq.distributed.shard_batches`), validation rows too, the guard
    decides on figures averaged over ranks, and only rank 0 writes
    ``metrics_path`` or shows progress; every rank returns the same history.

    ``checkpoint_dir``: write a checkpoint there before the first epoch and
    after every epoch (see :mod:`stabq.training.checkpoint`; ``run_info`` is
    stored in it). ``resume=True`` continues from that checkpoint instead: the
    caller passes the same model architecture, data and config (checked), and
    the run ends exactly as if it had never stopped.
    """
    config = config or TrainConfig()
    data = require_classes(as_labeled_data(train_data))
    if val is None:
        data, val_data = train_val_split(data, config.val_fraction, config.seed)
    else:  # class ids follow the training data's classes, by name
        val_data = with_classes(as_labeled_data(val), data.classes)
    for part in (data, val_data):
        require_fit(part, model.input_shape, model.num_classes)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    if fit_feature_stats:  # in one pass of chunks when the rows stay in their file
        stats = scan(data, model.stats_shape)
        model.set_feature_stats(torch.from_numpy(stats.mean), torch.from_numpy(stats.std))
    model.to(device)
    if config.compile:
        compile_module(model.quantizer)
    x = on_device(data.x, device)  # a tensor, or a reader of each batch's rows (stabq.rows)
    y = torch.from_numpy(data.y).to(device)
    vx = on_device(val_data.x, device, shard=True)
    vy = distributed.shard_rows(torch.from_numpy(val_data.y).to(device))

    optimizer = build_optimizer(list(model.parameters()), config)
    guard = StabilityGuard(
        model,
        optimizer,
        enabled=config.guards,
        spike_factor=config.spike_factor,
        feature_spike_factor=config.feature_spike_factor,
        window=config.guard_window,
        max_recoveries=config.max_recoveries,
        lr_backoff=config.lr_backoff,
        grad_clip=config.grad_clip,
    )
    guard.prime(*_reference_figures(model, x[: config.batch_size], y[: config.batch_size], vx, vy))
    guard.monitor = monitor = _attach_monitor(model)  # its state is the guard's, in checkpoints
    plan = _Plan(config, steps_per_epoch=distributed.steps_per_epoch(x.shape[0], config.batch_size))
    result = TrainResult(model=model)
    main = distributed.is_main()  # rank 0 alone writes the log and the checkpoints
    saver = Checkpointer.open(checkpoint_dir, resume, model, config, (data, val_data), writer=main)
    state, start = saver.resumed if saver else None, 0
    if state is not None:  # every rank restores the same state (rank 0's, on any world size)
        start = state.epoch
        if config.two_stage and start > plan.stage1:  # stage 2 had begun: its optimiser
            _freeze_projector(model, config)
            optimizer = _rebuild_optimizer(model, config, guard)
        result.history = state.restore(model, optimizer, guard, gen)
    started = time.perf_counter() - (state.seconds if state else 0.0)
    log = None  # a resumed run's log starts again from the history restored
    if metrics_path and main:
        lines = [json.dumps(r) for r in result.history] if state is not None else None
        log = AppendLog(metrics_path, ConfigError, "the metrics", lines)
    bar = tqdm(
        range(start, config.epochs),
        initial=start,
        total=config.epochs,
        desc=f"train {model.arch['quantizer']}",
        unit="epoch",
        disable=(None if config.progress is None else not config.progress) if main else True,
        leave=False,
    )
    try:
        if saver and main and state is None:
            saver.save(0, model, optimizer, guard, gen, [], run_info)
        for epoch in bar:
            if config.two_stage and epoch == plan.stage1:
                _enter_stage2(model, x, config)
                optimizer = _rebuild_optimizer(model, config, guard)
            model.quantizer.quantization_enabled = epoch >= plan.stage1
            if epoch in (start, plan.stage1):  # DDP over the parameters this stage trains
                idle = epoch < plan.stage1 and any(
                    p.requires_grad for p in model.quantizer.parameters()
                )
                forward = distributed.training_forward(model, device, all_used=not idle)
            model.quantize_mix = linear_ramp(epoch - plan.stage_start(epoch), config.ramp_epochs)
            epoch_started, events_before = time.perf_counter(), len(guard.events)
            alerts_before = len(monitor.alerts) if monitor is not None else 0
            sums = _train_epoch(
                model, forward, optimizer, guard, plan, epoch, x, y, gen, batch_transform
            )
            guard.require_progress(sums["applied"], epoch)
            figures = evaluate_model(model, vx, vy, sync=True)  # each rank holds a share
            if guard.end_epoch(len(guard.events) > events_before, figures["loss"], epoch):
                figures = evaluate_model(model, vx, vy, sync=True)  # back at the best epoch
            new_events = guard.events[events_before:]
            row = _epoch_row(model, plan, epoch, sums, figures)
            row.update(
                lr=sums["lr"],  # the rate of the epoch's last step, the guard's scale included
                guard_events=len(new_events),
                alerts=[a.message for a in monitor.alerts[alerts_before:]] if monitor else [],
                seconds=time.perf_counter() - epoch_started,
            )
            result.history.append(row)
            if log is not None:
                log.write(json.dumps(row))
            if saver and main:
                saver.save(epoch + 1, model, optimizer, guard, gen, result.history, run_info)
            if on_epoch is not None:
                on_epoch(row)
            bar.set_postfix(
                loss=f"{row['train_loss']:.3f}",
                acc=f"{row['val_accuracy']:.3f}",
                fill=f"{row['fill']:.3f}",
                ppl=f"{row['perplexity']:.1f}",
            )
        if result.history:
            guard.require_learned(result.history[-1]["val_loss"])
    except TrainingError:
        if saver and main:  # a diverged run would diverge again when resumed: nothing to keep
            saver.discard()
        raise
    finally:
        if monitor is not None:
            monitor.detach()
        bar.close()
        if log is not None:
            log.close()
    model.eval()
    result.guard_events = list(guard.events)
    result.seconds = time.perf_counter() - started
    return result


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


class _Plan:
    """Where each epoch and step stands: stages, schedules, progress."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int) -> None:
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.stage1 = config.first_stage_epochs
        self.total_steps = config.epochs * steps_per_epoch

    def stage_start(self, epoch: int) -> int:
        return 0 if epoch < self.stage1 else self.stage1

    def lr(self, epoch: int, i: int, lr_scale: float) -> float:
        """Cosine with warm-up within the current stage, times the guard's scale."""
        start = self.stage_start(epoch)
        stage_epochs = self.stage1 if epoch < self.stage1 else self.config.epochs - self.stage1
        step = (epoch - start) * self.steps_per_epoch + i
        warmup = round(self.config.warmup_epochs * self.steps_per_epoch)
        factor = cosine_with_warmup(step, stage_epochs * self.steps_per_epoch, warmup)
        return self.config.lr * factor * lr_scale

    def progress(self, epoch: int, i: int) -> float:
        """Fraction of all training steps done, in [0, 1] (drives Gumbel's tau)."""
        return min(1.0, (epoch * self.steps_per_epoch + i) / max(1, self.total_steps - 1))


def _train_epoch(
    model: BottleneckClassifier,
    forward: Callable,
    optimizer: torch.optim.Optimizer,
    guard: StabilityGuard,
    plan: _Plan,
    epoch: int,
    x: Features,
    y: torch.Tensor,
    gen: torch.Generator,
    batch_transform: BatchTransform | None,
) -> dict[str, float]:
    """One pass over the data; each step checked by the guard. Returns the epoch's sums."""
    config = plan.config
    sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "applied": 0, "max_loss": 0.0, "max_norm": 0.0}
    sums["lr"] = optimizer.param_groups[0]["lr"]
    model.train()
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    order, batch_size = distributed.shard_batches(order, config.batch_size)
    for i in range(plan.steps_per_epoch):
        step = epoch * plan.steps_per_epoch + i
        idx = order[i * batch_size : (i + 1) * batch_size]
        xb, yb = x[idx], y[idx]
        if batch_transform is not None:
            xb, yb = batch_transform(step, xb, yb)
        for group in optimizer.param_groups:  # the guard scales it while it steps
            group["lr"] = plan.lr(epoch, i, 1.0)
        sums["lr"] = plan.lr(epoch, i, guard.lr_scale)
        model.quantizer.set_progress(plan.progress(epoch, i))
        # the guard takes the largest norm over all ranks: every rank skips the same batches
        if not guard.admit(_standardized(model, xb), step=step, epoch=epoch):
            continue
        logits, out, z = forward(xb)
        ce = F.cross_entropy(logits.float(), yb)
        loss = ce + out.loss
        norm = float(z.detach().norm(dim=-1).max()) if z.numel() else 0.0
        # the guard must decide the same on every rank: it sees the mean loss, the max norm
        (loss_value, ce_value, aux_value), (norm,) = distributed.mean_and_max(
            [float(loss.detach()), float(ce.detach()), float(out.loss.detach())], [norm]
        )
        sums["max_loss"] = max(sums["max_loss"], loss_value if np.isfinite(loss_value) else np.inf)
        sums["max_norm"] = max(sums["max_norm"], norm)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not guard.step(loss_value, feature_norm=norm, agreed=True, step=step, epoch=epoch):
            continue
        sums["applied"] += 1
        sums["loss"] += loss_value
        sums["ce"] += ce_value
        sums["aux"] += aux_value
    return sums


def _epoch_row(
    model: BottleneckClassifier,
    plan: _Plan,
    epoch: int,
    sums: dict[str, float],
    figures: dict[str, Any],
) -> dict[str, Any]:
    applied = max(1, sums["applied"])
    quantized = epoch >= plan.stage1
    return {
        "epoch": epoch + 1,
        "stage": 2 if plan.config.two_stage and quantized else 1,
        "quantized": quantized,
        "train_loss": sums["loss"] / applied,
        "train_ce": sums["ce"] / applied,
        "train_aux": sums["aux"] / applied,
        "val_loss": figures["loss"],
        "val_accuracy": figures["accuracy"],
        **{key: figures[key] for key in HEALTH_FIGURES},
        "tau": getattr(model.quantizer, "tau", None),
        "mix": model.quantize_mix,
        "max_feature_norm": sums["max_norm"],
        "max_loss": sums["max_loss"],
    }


def _enter_stage2(model: BottleneckClassifier, x: Features, config: TrainConfig) -> None:
    """Seed the codebooks on the stage-1 features; optionally freeze the projector."""
    model.eval()
    with torch.no_grad():
        sample = x[torch.randperm(x.shape[0])[:20000].to(x.device)]
        features = model.features(distributed.shard_rows(sample))
    model.quantizer.init_from_features(features)
    _freeze_projector(model, config)


def _freeze_projector(model: BottleneckClassifier, config: TrainConfig) -> None:
    """Stage 2 with ``freeze_projector``: the projector's weights take no more steps.

    Their last stage-1 gradients go too, or gradient clipping would count them.
    """
    if config.freeze_projector:
        for p in model.projector.parameters():
            p.requires_grad_(False)
            p.grad = None


def _rebuild_optimizer(
    model: BottleneckClassifier,
    config: TrainConfig,
    guard: StabilityGuard,
) -> torch.optim.Optimizer:
    """A fresh optimiser over the trainable parameters for stage 2; the guard follows it."""
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config)
    guard.follow(optimizer)
    return optimizer


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (the default), or SGD with ``config.momentum`` when ``config.optimizer="sgd"``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
