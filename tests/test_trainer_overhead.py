"""The trainer's per-step work, cut for speed, decides as before: the same batches skipped,
the same steps undone, the same history and final weights, bit for bit.

The reference is the training step as it was written before the cut, kept here with the
guard's public API (``admit`` on the standardised batch, ``step`` with host figures);
each run is poisoned (a non-finite batch, a huge one, a large one) and some are trained
at rates that make the loss and the features spike, so every kind of guard event occurs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stabq.training.epochs as epochs_module
from stabq import BottleneckClassifier, TrainConfig, train
from stabq.data import load_data
from stabq.training.evaluation import standardized

pytestmark = pytest.mark.outcome  # the events depend on how training goes


def reference_train_epoch(model, forward, optimizer, guard, plan, epoch, x, y, gen,
                          batch_transform, scaler=None):  # fmt: skip
    """One epoch as the trainer ran it before: host figures at every step (one process),
    float32 (no GradScaler)."""
    assert scaler is None
    sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "applied": 0, "max_loss": 0.0, "max_norm": 0.0}
    sums["lr"] = optimizer.param_groups[0]["lr"]
    model.train()
    order = torch.randperm(x.shape[0], generator=gen)
    batch_size = plan.config.batch_size
    for i in range(plan.steps_per_epoch):
        step = epoch * plan.steps_per_epoch + i
        idx = order[i * batch_size : (i + 1) * batch_size]
        xb, yb = x[idx], y[idx]
        if batch_transform is not None:
            xb, yb = batch_transform(step, xb, yb)
        for group in optimizer.param_groups:
            group["lr"] = plan.lr(epoch, i, 1.0)
        sums["lr"] = plan.lr(epoch, i, guard.lr_scale)
        model.quantizer.set_progress(plan.progress(epoch, i))
        if not guard.admit(standardized(model, xb), step=step, epoch=epoch):
            continue
        logits, out, z = forward(xb)
        ce = F.cross_entropy(logits.float(), yb)
        loss = ce + out.loss
        norm = float(z.detach().norm(dim=-1).max()) if z.numel() else 0.0
        loss_value, ce_value, aux_value = (
            float(loss.detach()),
            float(ce.detach()),
            float(out.loss.detach()),
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


def poison(step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-finite batch (skipped), a huge one (skipped), a large one (let in)."""
    if step == 7:
        x = torch.full_like(x, math.nan)
    if step == 13:
        x = x * 1e8
    if step == 21:
        x = x * 30
    return x, y


_ALL = load_data("synthetic:16", "train")
DATA = (_ALL.x[:1280], _ALL.y[:1280])  # 18 steps an epoch


def run(preset: str, lr: float, guards: bool = True):
    torch.manual_seed(0)
    model = BottleneckClassifier(16, 10, preset, hidden=32, bottleneck_dim=16)
    config = TrainConfig(epochs=3, batch_size=64, lr=lr, seed=0, progress=False,
                         guard_window=10, max_recoveries=30, guards=guards)  # fmt: skip
    result = train(model, DATA, config=config, batch_transform=poison)
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    return model, result.guard_events, history


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN where NaN (an unguarded poisoned run's weights)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


# (preset, lr): the steps of the guard's events as the trainer gave them before the cut
# (-1: an epoch that went back to the best one)
CASES = {
    ("none", 3.0): [2, 5, 7, 9, 13, 14, -1],
    ("vq", 1.0): [5, 7, 9, 13, 15, 17, 20, 21, 23],
    ("vq-ema", 2.0): [3, 6, 7, 10, 13, -1, 21],
}


@pytest.mark.parametrize(("preset", "lr"), list(CASES))
def test_the_guard_decides_as_the_reference_step_did(preset, lr, monkeypatch):
    model, events, history = run(preset, lr)
    with monkeypatch.context() as patch:
        patch.setattr(epochs_module, "_train_epoch", reference_train_epoch)
        ref_model, ref_events, ref_history = run(preset, lr)
    assert [e["step"] for e in events] == CASES[preset, lr]
    assert events == ref_events
    assert history == ref_history
    state, ref_state = model.state_dict(), ref_model.state_dict()
    assert all(identical(v, ref_state[k]) for k, v in state.items())


def test_without_guards_the_step_is_the_reference_step_too(monkeypatch):
    model, events, history = run("fsq", 3e-3, guards=False)
    with monkeypatch.context() as patch:
        patch.setattr(epochs_module, "_train_epoch", reference_train_epoch)
        ref_model, _, ref_history = run("fsq", 3e-3, guards=False)
    assert events == [] and json.dumps(history) == json.dumps(ref_history)  # NaN included
    state, ref_state = model.state_dict(), ref_model.state_dict()
    assert all(identical(v, ref_state[k]) for k, v in state.items())
