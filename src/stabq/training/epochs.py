"""The epochs of one training run, one at a time: stages, schedules, the guard's verdicts.

:class:`Epochs` holds what changes from epoch to epoch (the optimiser, rebuilt for the
quantized stage; the DDP forward; the history) and yields one history row an epoch;
:func:`stabq.train` decides what happens around it (data, checkpoints, the metrics file).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from stabq import distributed
from stabq.model.classifier import BottleneckClassifier
from stabq.training.config import TrainConfig, TrainResult
from stabq.training.evaluation import HEALTH_FIGURES, Features, evaluate_model, standardized
from stabq.training.guard import StabilityGuard
from stabq.training.precision import autocast, grad_scaler
from stabq.training.schedule import cosine_with_warmup, linear_ramp, warmup_then_constant
from stabq.training.stopping import Stopping

BatchTransform = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Rows:
    """A run's rows on its device: training ``x`` ``(n, ...)`` (a tensor, or a reader of each
    batch's rows) and ``y`` ``(n,)``; this rank's share of the validation rows ``vx``, ``vy``."""

    x: Features
    y: torch.Tensor
    vx: Features
    vy: torch.Tensor


class _Plan:
    """Where each epoch and step stands: stages, schedules, progress.

    With ``config.patience``, ``stopping`` ends each stage and scales its rate; ``stage1``
    is then stage 1's ceiling until stage 1 ends, and where it ended after.
    """

    def __init__(self, config: TrainConfig, steps_per_epoch: int) -> None:
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.stage1 = config.first_stage_epochs
        self.total_steps = config.epochs * steps_per_epoch
        self.stopping = None
        if config.patience is not None:
            self.stopping = Stopping(config.patience, config.lr_drops, monitor=config.monitor)

    def stage_start(self, epoch: int) -> int:
        return 0 if epoch < self.stage1 else self.stage1

    def lr(self, epoch: int, i: int, lr_scale: float) -> float:
        """The stage's schedule (cosine with warm-up, or the plateau's constant rate with
        warm-up and its drops), times the guard's scale."""
        start = self.stage_start(epoch)
        step = (epoch - start) * self.steps_per_epoch + i
        warmup = round(self.config.warmup_epochs * self.steps_per_epoch)
        if self.stopping is not None:
            factor = warmup_then_constant(step, warmup) * self.stopping.scale
            return self.config.lr * factor * lr_scale
        stage_epochs = self.stage1 if epoch < self.stage1 else self.config.epochs - self.stage1
        factor = cosine_with_warmup(step, stage_epochs * self.steps_per_epoch, warmup)
        return self.config.lr * factor * lr_scale

    def progress(self, epoch: int, i: int) -> float:
        """Fraction of all training steps done, in [0, 1] (drives Gumbel's tau); with
        ``patience``, of the first third of the ceiling (the run's length is not known
        in advance; a stage goes on while the annealing still improves it)."""
        total = self.total_steps if self.stopping is None else self.total_steps // 3
        return min(1.0, (epoch * self.steps_per_epoch + i) / max(1, total - 1))

    def end_of(self, epoch: int, figures: dict[str, float], model: nn.Module,
               optimizer: Any) -> str | None:  # fmt: skip
        """After epoch ``epoch`` (0-based): ``"stage1"`` or ``"run"`` when a stage ends
        here (the model back at the stage's best epoch), else None."""
        done = epoch + 1
        in_stage1 = done <= self.stage1
        if self.stopping is None:
            return "run" if done >= self.config.epochs else None
        ended = self.stopping.update(figures["accuracy"], figures["loss"], done, model, optimizer)
        ceiling = self.stage1 if in_stage1 else self.config.epochs
        if not (ended or done >= ceiling):
            return None
        self.stopping.go_back(model, optimizer)
        if in_stage1:
            self.stage1 = self.stopping.stage1_end = done
            self.stopping.start_stage()
            return "stage1"
        self.stopping.finished = True
        return "run"


class Epochs:
    """The epochs of one run: :meth:`restore` a checkpoint's state (if any), then iterate
    :meth:`run` for one history row an epoch.

    Args:
        model: the classifier, on ``device``.
        config: the run's options.
        rows: its rows on ``device``.
        guard: the primed :class:`StabilityGuard` over ``optimizer``.
        optimizer: the first stage's optimiser (:meth:`run` rebuilds it for stage 2).
        gen: the generator of the batch order.
        device: where the model trains.
        batch_transform: ``(step, x, y) -> (x, y)``, applied to each batch (or None).
    """

    def __init__(
        self,
        model: BottleneckClassifier,
        config: TrainConfig,
        rows: Rows,
        guard: StabilityGuard,
        optimizer: torch.optim.Optimizer,
        gen: torch.Generator,
        device: torch.device,
        batch_transform: BatchTransform | None = None,
    ) -> None:
        self.model, self.config, self.rows, self.guard = model, config, rows, guard
        self.optimizer, self.gen, self.device = optimizer, gen, device
        self.batch_transform = batch_transform
        steps = distributed.steps_per_epoch(rows.x.shape[0], config.batch_size)
        self.plan = _Plan(config, steps_per_epoch=steps)
        guard.stopping = self.plan.stopping  # its state goes into checkpoints with the guard's
        self.result = TrainResult(model=model)
        self.start, self.seconds_before, self.resumed = 0, 0.0, False
        self.forward: Callable | None = None
        self.scaler = grad_scaler(config.precision, device)  # "16-mixed" only, else None

    def restore(self, state: Any) -> TrainResult:
        """Continue from a checkpoint's ``state`` (None: a fresh run); every rank restores
        the same state (rank 0's, on any world size). Returns the run's result so far."""
        if state is None:
            return self.result
        self.start, self.seconds_before, self.resumed = state.epoch, state.seconds, True
        stopping = state.document["guard"].get("stopping")
        if self.plan.stopping is not None and stopping is not None:  # where stage 1 ended
            self.plan.stage1 = stopping["stage1_end"] or self.plan.stage1
        if self.config.two_stage and self.start > self.plan.stage1:  # stage 2 had begun
            _freeze_projector(self.model, self.config)
            self.optimizer = _rebuild_optimizer(self.model, self.config, self.guard)
        self.result.history = state.restore(
            self.model, self.optimizer, self.guard, self.gen, scaler=self.scaler
        )
        return self.result

    def run(self, show: bool | None) -> Iterator[dict[str, Any]]:
        """The remaining epochs, each as its history row once it is in ``result.history``;
        ``show``: a progress bar (None: on a terminal only)."""
        bar = tqdm(
            range(self.start, self.config.epochs), initial=self.start, total=self.config.epochs,
            desc=f"train {self.model.arch['quantizer']}", unit="epoch",
            disable=None if show is None else not show, leave=False,
        )  # fmt: skip
        stopping = self.plan.stopping
        try:
            for epoch in bar:
                if stopping is not None and stopping.finished:
                    break
                row = self.epoch(epoch)
                self.result.history.append(row)
                yield row
                bar.set_postfix(
                    loss=f"{row['train_loss']:.3f}", acc=f"{row['val_accuracy']:.3f}",
                    fill=f"{row['fill']:.3f}", ppl=f"{row['perplexity']:.1f}",
                )  # fmt: skip
            if stopping is not None:
                self.result.best_epoch = stopping.best_epoch or None
            if self.result.history:
                self.guard.require_learned(self.result.history[-1]["val_loss"])
        finally:
            bar.close()

    def epoch(self, epoch: int) -> dict[str, Any]:
        """Train epoch ``epoch`` (entering stage 2 when it begins), evaluate, and return its
        history row; the guard may take the model back to its best epoch first."""
        model, plan, guard, rows = self.model, self.plan, self.guard, self.rows
        if self.config.two_stage and epoch == plan.stage1:
            _enter_stage2(model, rows.x, self.config)
            self.optimizer = _rebuild_optimizer(model, self.config, guard)
        model.quantizer.quantization_enabled = epoch >= plan.stage1
        if epoch in (self.start, plan.stage1):  # DDP over the parameters this stage trains
            idle = epoch < plan.stage1 and any(
                p.requires_grad for p in model.quantizer.parameters()
            )
            self.forward = distributed.training_forward(model, self.device, all_used=not idle)
        model.quantize_mix = linear_ramp(epoch - plan.stage_start(epoch), self.config.ramp_epochs)
        started, events_before = time.perf_counter(), len(guard.events)
        monitor = guard.monitor
        alerts_before = len(monitor.alerts) if monitor is not None else 0
        sums = _train_epoch(
            model, self.forward, self.optimizer, guard, plan, epoch, rows.x, rows.y, self.gen,
            self.batch_transform, scaler=self.scaler,
        )  # fmt: skip
        guard.require_progress(sums["applied"], epoch)
        with autocast(self.config.precision, self.device):  # validation as it trains
            figures = evaluate_model(model, rows.vx, rows.vy, sync=True)  # a share a rank
            if guard.end_epoch(len(guard.events) > events_before, figures["loss"], epoch):
                figures = evaluate_model(model, rows.vx, rows.vy, sync=True)  # at the best
        row = _epoch_row(model, plan, epoch, sums, figures)
        row["stage_end"] = plan.end_of(epoch, figures, model, self.optimizer)
        row.update(
            lr=sums["lr"],  # the rate of the epoch's last step, the guard's scale included
            guard_events=len(guard.events[events_before:]),
            alerts=[a.message for a in monitor.alerts[alerts_before:]] if monitor else [],
            seconds=time.perf_counter() - started,
        )
        if self.scaler is not None:
            row["scaler_skips"] = sums["scaler_skips"]
        return row


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
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over the data; each step checked by the guard. Returns the epoch's sums.
    Forwards run under ``config.precision``'s autocast; ``scaler``'s skips: ``scaler_skips``."""
    config = plan.config
    sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "applied": 0, "max_loss": 0.0, "max_norm": 0.0}
    sums["scaler_skips"] = 0
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
        rate = plan.lr(epoch, i, 1.0)
        for group in optimizer.param_groups:  # the guard scales it while it steps
            group["lr"] = rate
        sums["lr"] = rate * guard.lr_scale
        model.quantizer.set_progress(plan.progress(epoch, i))
        # the guard takes the largest norm over all ranks: every rank skips the same batches
        if guard.enabled and not guard.admit(standardized(model, xb), step=step, epoch=epoch):
            continue
        with autocast(config.precision, xb.device):
            logits, out, z = forward(xb)
        ce = F.cross_entropy(logits.float(), yb)
        loss = ce + out.loss
        loss_value, ce_value, aux_value, norm = _step_figures(loss, ce, out.loss, z)
        finite = loss_value if math.isfinite(loss_value) else math.inf
        sums["max_loss"] = max(sums["max_loss"], finite)
        sums["max_norm"] = max(sums["max_norm"], norm)
        optimizer.zero_grad(set_to_none=True)
        scale = scaler.get_scale() if scaler is not None else None  # "16-mixed": scaled
        (loss if scaler is None else scaler.scale(loss)).backward()
        applied = guard.step(
            loss_value, feature_norm=norm, agreed=True, step=step, epoch=epoch, scaler=scaler
        )
        if scaler is not None and scaler.get_scale() < scale:  # fp16 overflow: the scaler's
            sums["scaler_skips"] += 1
            continue
        if not applied:
            continue
        sums["applied"] += 1
        sums["loss"] += loss_value
        sums["ce"] += ce_value
        sums["aux"] += aux_value
    return sums


def _step_figures(
    loss: torch.Tensor, ce: torch.Tensor, aux: torch.Tensor, z: torch.Tensor
) -> tuple[float, float, float, float]:
    """The step's loss, cross-entropy and auxiliary loss, averaged over the ranks, and the
    largest feature norm over them: what the guard decides from, the same on every rank."""
    # z.norm(dim=-1)'s kernel, without its Python dispatch
    norm = torch.linalg.vector_norm(z.detach(), dim=-1).max() if z.numel() else loss.new_zeros(())
    # one device sync for the step's figures (the promotion to a common dtype is exact)
    *means, norm = torch.stack([loss.detach(), ce.detach(), aux.detach(), norm]).tolist()
    (loss_value, ce_value, aux_value), (norm,) = distributed.mean_and_max(means, [norm])
    return loss_value, ce_value, aux_value, norm


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


__all__ = ["BatchTransform", "Epochs", "Rows", "build_optimizer"]
