"""Training until it stops improving: the plateau schedule, and where a stage ends.

With :attr:`TrainConfig.patience <stabq.TrainConfig>` set, a stage (the whole run, or
each stage of two-stage training) trains at a constant rate after its warm-up. After
every epoch its validation figures are compared with the stage's best: an epoch
improves on it with a higher validation accuracy, or the same accuracy at a validation
loss lower by more than a relative ``1e-4`` (``monitor="val_loss"``: the loss alone).
When no epoch has improved for ``patience`` epochs, the rate drops 10x and the count
starts again; once the rate has dropped ``lr_drops`` times, ``patience`` more epochs
without improvement end the stage.
The stage's ceiling (``epochs``; for stage 1 of two-stage training, its share) ends it
too. At the end of a stage the model goes back to its best epoch: its weights, buffers
(EMA codebooks, dead-code counters) and optimiser state.

Why the accuracy first: it is what a comparison reports, and a classifier's
validation loss turns up (its predictions grow over-confident) long before its
accuracy stops rising. Stopped at the lowest validation loss, stabq's MLP on mnist1d
ended 3 to 8 points below the same runs stopped by accuracy (``benchmarks/stopping.py``;
the quality benchmarks page has the table). The loss breaks ties, so that a flat stretch of
the coarse accuracy still counts as progress while the loss falls.

Why drop the rate before stopping: at a constant rate the weights keep moving around
the plateau; each drop lets them settle to its floor, which is what a cosine schedule
of the right length reaches, without knowing that length in advance.

Example::

    config = TrainConfig(patience=5, epochs=150)  # at most 150 epochs
    result = train(model, (x, y), config=config)
    result.best_epoch  # the epoch the model went back to
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

THRESHOLD = 1e-4  # relative: a loss must beat the best loss by this much


class Stopping:
    """Where a stage stands on its plateau: best loss and epoch, epochs waited, drops.

    Args:
        patience: epochs without improvement before a drop, or before the end.
        drops: rate drops before the stage may end.
        factor: each drop multiplies the rate by this (in (0, 1)).
        monitor: ``"val_accuracy"`` (the loss breaking ties) or ``"val_loss"`` alone.

    ``best`` is the best epoch's ``(accuracy, loss)``; its state (model and optimiser) is
    held on the model's device.
    """

    def __init__(
        self, patience: int, drops: int = 2, factor: float = 0.1, monitor: str = "val_accuracy"
    ) -> None:
        self.patience, self.drops, self.factor, self.monitor = patience, drops, factor, monitor
        self.stage1_end: int | None = None  # two-stage: epochs in stage 1, once it ended
        self.finished = False  # the run ended (a resumed run trains no more)
        self.start_stage()

    def start_stage(self) -> None:
        """Forget the previous stage's best: a new stage starts its own count."""
        self.best, self.best_epoch, self.wait, self.dropped = (-math.inf, math.inf), 0, 0, 0
        self.scale = 1.0
        self.best_state: tuple[dict, dict] | None = None

    def improves(self, accuracy: float, loss: float) -> bool:
        """Whether ``(accuracy, loss)`` beats the best: a higher accuracy, or the same
        accuracy at a loss lower by more than a relative ``THRESHOLD``."""
        if not (math.isfinite(loss) and math.isfinite(accuracy)):
            return False
        best_acc, best_loss = self.best
        if self.monitor == "val_loss" and math.isfinite(best_loss):
            return loss < best_loss - THRESHOLD * abs(best_loss)
        if self.monitor == "val_accuracy" and accuracy != best_acc:
            return accuracy > best_acc
        return not math.isfinite(best_loss) or loss < best_loss - THRESHOLD * abs(best_loss)

    def update(
        self,
        accuracy: float,
        loss: float,
        epoch: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> bool:
        """Take epoch ``epoch``'s (1-based) validation accuracy and loss; True when the
        stage ends. An improvement keeps the model's and ``optimizer``'s state as the best.
        """
        if self.improves(accuracy, loss):
            self.best, self.best_epoch, self.wait = (accuracy, loss), epoch, 0
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.best_state = (state, copy.deepcopy(optimizer.state_dict()))
            return False
        self.wait += 1
        if self.wait < self.patience:
            return False
        if self.dropped < self.drops:
            self.dropped, self.wait, self.scale = self.dropped + 1, 0, self.scale * self.factor
            return False
        return True

    def go_back(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Put the best epoch's state back (nothing when no epoch improved)."""
        if self.best_state is not None:
            rates = [group["lr"] for group in optimizer.param_groups]
            model.load_state_dict(self.best_state[0])
            optimizer.load_state_dict(copy.deepcopy(self.best_state[1]))
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = rate

    def state_dict(self) -> dict[str, Any]:
        """The counters as plain values (the best state goes to checkpoints apart)."""
        return {
            "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
            "dropped": self.dropped, "scale": self.scale, "stage1_end": self.stage1_end,
            "finished": self.finished,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` gave."""
        self.best, self.best_epoch = tuple(state["best"]), state["best_epoch"]
        self.wait = state["wait"]
        self.dropped, self.scale = state["dropped"], state["scale"]
        self.stage1_end, self.finished = state["stage1_end"], state["finished"]


__all__ = ["THRESHOLD", "Stopping"]
