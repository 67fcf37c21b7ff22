"""The stability guard (:class:`StabilityGuard` says what it checks and how it recovers);
at the end of each epoch it may go back to the best epoch (:mod:`~.best_epoch`)."""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from typing import Any

import torch
from torch import nn

from stabq import distributed
from stabq.errors import TrainingError
from stabq.training.best_epoch import BestEpoch, cloned, finite_state

GROWTH_STEPS = 10  # features 100x their smallest norm of the last 10 steps are exploding


def largest_row_norm(x: torch.Tensor) -> float:
    """The largest row norm of ``x`` (rows along dim 0, or the last dim for features)."""
    if not x.numel():
        return 0.0
    x = x.detach().float()
    if x.dim() > 1:  # x.flatten(1).norm(dim=1)'s kernel, without its Python dispatch
        return float(torch.linalg.vector_norm(x.flatten(1), dim=1).max())
    return float(x.abs().max())


def global_grad_norm(model: nn.Module) -> torch.Tensor:
    """The 2-norm of all of ``model``'s gradients together (0 when there are none)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


class StabilityGuard(BestEpoch):
    """Undo a bad optimiser step instead of letting it wreck the run (what `stabq.train` uses).

    In a loop of your own: `admit(x)` says whether a batch may be used, and
    `step(loss, features=z)` takes the place of `optimizer.step()`. A batch is left out
    when its inputs are not finite or its largest row norm exceeds `feature_spike_factor`
    x the median of recent batches'. A step is bad when its loss is not finite or above
    `spike_factor` x the median of the last `window` good losses (floored at 1.0), its
    largest bottleneck feature norm above `feature_spike_factor` x the smallest of the
    last 10 steps', or its gradient norm not finite. A bad step puts back the last
    snapshot (weights, buffers such as EMA codebooks, optimiser state) and scales the
    rate by `lr_backoff`; every `window` clean steps it doubles back, never above a rate
    that failed twice. The scale applies only while the guard steps, so a scheduler keeps
    owning the rate. Under torch.distributed, decisions use figures agreed over the ranks.

    Args:
        model: the model being trained.
        optimizer: its optimiser, which the guard steps.
        enabled: False turns every check off: `admit` takes every batch, `step` steps.
        spike_factor: a loss above this times the recent median is a bad step.
        feature_spike_factor: the bound on the feature and input norms' growth.
        window: the good losses the median covers; clean steps between the rate's doublings.
        max_recoveries: recoveries allowed without a clean epoch between them; one more
            raises `TrainingError`.
        lr_backoff: each recovery scales the rate by this, in (0, 1).
        snapshot_every: clean steps between snapshots (each once every weight is finite).
        grad_clip: clip the gradient norm to this before each step; None: no clipping.

    Examples:
        >>> import torch, stabq
        >>> model = torch.nn.Linear(4, 2)
        >>> guard = stabq.StabilityGuard(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> x = torch.randn(8, 4)
        >>> if guard.admit(x):
        ...     loss = model(x).pow(2).mean()
        ...     loss.backward()
        ...     print(guard.step(loss, features=x))
        True
        >>> guard.step(torch.tensor(float("nan")))  # undone: the last snapshot comes back
        False
        >>> guard.events[-1]["reason"], guard.lr_scale
        ('loss is nan', 0.5)
    """

    @classmethod
    def from_config(
        cls, model: nn.Module, optimizer: torch.optim.Optimizer, config: Any
    ) -> StabilityGuard:
        """The guard a `TrainConfig` (`config`: guards, thresholds) sets on `model`, `optimizer`."""
        return cls(
            model, optimizer, enabled=config.guards, spike_factor=config.spike_factor,
            feature_spike_factor=config.feature_spike_factor, window=config.guard_window,
            max_recoveries=config.max_recoveries, lr_backoff=config.lr_backoff,
            grad_clip=config.grad_clip,
        )  # fmt: skip

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        enabled: bool = True,
        spike_factor: float = 10.0,
        feature_spike_factor: float = 100.0,
        window: int = 50,
        max_recoveries: int = 10,
        lr_backoff: float = 0.5,
        snapshot_every: int = 10,
        grad_clip: float | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.grad_clip = grad_clip
        self.steps, self.epoch = 0, 0  # positions for the events of a user's own loop
        self.enabled = enabled
        self.spike_factor, self.feature_spike_factor = spike_factor, feature_spike_factor
        self.window, self.max_recoveries = window, max_recoveries
        self.lr_backoff, self.snapshot_every = lr_backoff, snapshot_every
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.inputs: deque[float] = deque(maxlen=window)
        self.lr_scale = 1.0
        self.recoveries = 0  # since the last clean epoch
        self.clean_steps = 0
        self.events: list[dict[str, Any]] = []
        self.lr_ceiling = 1.0  # the rate never doubles back above this
        self.epoch_recoveries = 0
        self.best_val = self.untrained_val = math.inf
        self.undone = 0  # steps undone in the whole run
        self._snapshot: tuple[dict, dict] | None = None
        self._anchor: tuple[dict, dict] | None = None  # the best epoch's state
        # stabq.train's CollapseMonitor: explains events, checkpointed with the guard
        self.monitor: Any = None
        self.stopping: Any = None  # the plateau's Stopping (stabq.train sets it), likewise
        self.snapshot()

    def _copy(self) -> tuple[dict, dict]:
        return cloned(self.model.state_dict()), cloned(self.optimizer.state_dict())

    def _restore(self, saved: tuple[dict, dict]) -> None:
        rates = [group["lr"] for group in self.optimizer.param_groups]
        self.model.load_state_dict(saved[0])
        self.optimizer.load_state_dict(cloned(saved[1]))
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate  # the schedule's, not the saved one (each step sets it anyway)

    def snapshot(self) -> None:
        """Remember the current weights, buffers and optimiser state as the last good ones."""
        if self.enabled:
            self._snapshot = self._copy()

    def admit(self, x: torch.Tensor, *, step: int | None = None, epoch: int | None = None) -> bool:
        """Whether a batch may be used: False (the reason in `events`; nothing undone, the
        rate stays) when it is not finite or its largest row norm is `feature_spike_factor`
        x the median of recent batches'.

        Args:
            x: the batch's inputs, rows along dim 0.
            step: the step to record in an event (default: the guard's own count).
            epoch: the epoch to record in an event (default: the guard's own).
        """
        if not self.enabled:
            return True
        norm = distributed.mean_and_max([], [largest_row_norm(x)])[1][0]
        reason = self.check_input(norm)
        if reason is None:
            return True
        self.skip(reason, *self._position(step, epoch))
        return False

    def _position(self, step: int | None, epoch: int | None) -> tuple[int, int]:
        """(step, epoch) for an event: the caller's, or the guard's own count of calls."""
        at = (self.steps if step is None else step, self.epoch if epoch is None else epoch)
        self.steps += step is None
        return at

    def step(
        self,
        loss: torch.Tensor | float,
        features: torch.Tensor | None = None,
        *,
        feature_norm: float | None = None,
        scaler: Any = None,
        agreed: bool = False,
        step: int | None = None,
        epoch: int | None = None,
    ) -> bool:
        """Apply the optimiser step of this loss (backward done): True, or undo it: False.

        Args:
            loss: the step's loss (unscaled under a GradScaler).
            features: `(..., d)`, the bottleneck's input, whose largest row norm is checked.
            feature_norm: that norm, given instead of `features`.
            scaler: a `torch.amp.GradScaler`; its overflow skips stay its own.
            agreed: the figures are already agreed over the ranks.
            step: the step to record in an event (default: the guard's own count).
            epoch: the epoch to record in an event (default: the guard's own).

        Raises:
            TrainingError: more than `max_recoveries` recoveries without a clean epoch.
        """
        at = self._position(step, epoch)
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if feature_norm is None:
            feature_norm = 0.0 if features is None else largest_row_norm(features)
        if not agreed:
            (value,), (feature_norm,) = distributed.mean_and_max([value], [feature_norm])
        reason = self.check(value, feature_norm)
        overflow = False
        if reason is None:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            if self.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            elif self.enabled:
                grad_norm = global_grad_norm(self.model)
            if self.enabled and not bool(torch.isfinite(grad_norm)):
                overflow = scaler is not None  # fp16 overflow: the scaler skips and backs off
                if not overflow:
                    reason = f"gradient norm is {float(grad_norm)}"
        if reason is not None:  # before any unscale_: the scaler has nothing to forget
            self.recover(reason, *at)
            return False
        rates = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * self.lr_scale
        try:
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
        finally:
            for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
        if overflow:
            return False
        self.accept(value, feature_norm)
        return True

    def review(
        self,
        loss: torch.Tensor | float,
        feature_norm: float = 0.0,
        *,
        step: int | None = None,
        epoch: int | None = None,
    ) -> bool:
        """For loops that step on their own (Lightning): after the step, keep it (True) or
        undo it (False: the last snapshot back at a lower rate, as `step` does)."""
        at = self._position(step, epoch)
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        (value,), (feature_norm,) = distributed.mean_and_max([value], [feature_norm])
        reason = self.check(value, feature_norm)
        if reason is not None:
            self.recover(reason, *at)
            return False
        self.accept(value, feature_norm)
        return True

    def hold(self) -> tuple[dict, dict]:
        """A copy of the weights, buffers and optimiser state, for `put_back`."""
        return self._copy()

    def put_back(self, state: tuple[dict, dict]) -> None:
        """Return to a state that `hold` gave (the rates stay the current ones)."""
        self._restore(state)

    def check(self, loss: float, feature_norm: float) -> str | None:
        """The reason this step is bad, or None to apply it."""
        if not self.enabled:
            return None
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(feature_norm):
            return f"feature norm is {feature_norm}"
        if self.losses:  # primed with the untrained model's figures, so from the first step
            median = statistics.median(self.losses)
            # the floor of 1.0 keeps ordinary noise on a small, well-trained loss from counting
            if loss > self.spike_factor * max(median, 1.0):
                return f"loss {loss:.4g} > {self.spike_factor:g} x recent median {median:.4g}"
            norm_min = min(itertools.islice(reversed(self.norms), GROWTH_STEPS))
            if feature_norm > self.feature_spike_factor * max(norm_min, 1e-6):
                return (
                    f"feature norm {feature_norm:.4g} > {self.feature_spike_factor:g} x "
                    f"recent minimum {norm_min:.4g}"
                )
        return None

    def check_input(self, input_norm: float) -> str | None:
        """Why to leave a batch out (its largest standardised row norm given), or None."""
        if not self.enabled:
            return None
        if not math.isfinite(input_norm):
            return "non-finite input batch skipped"
        if self.inputs:
            median = statistics.median(self.inputs)
            if input_norm > self.feature_spike_factor * max(median, 1e-6):
                return (
                    f"input norm {input_norm:.4g} > {self.feature_spike_factor:g} x recent "
                    f"median {median:.4g}: batch skipped"
                )
        self.inputs.append(input_norm)
        return None

    def accept(self, loss: float, feature_norm: float) -> None:
        """Record a clean step; snapshot and restore the learning rate on schedule."""
        self.losses.append(loss)
        self.norms.append(feature_norm)
        self.clean_steps += 1
        if self.clean_steps % self.window == 0 and self.lr_scale < self.lr_ceiling:
            self.lr_scale = min(self.lr_ceiling, self.lr_scale / self.lr_backoff)
        if self.enabled and self.clean_steps % self.snapshot_every == 0:
            if finite_state(self.model):
                self.snapshot()
            else:
                self.recover(reason="non-finite weights after a step", step=-1, epoch=-1)

    def _explained(self, reason: str) -> str:
        """``reason`` with the mechanisms the monitor names now, if any."""
        holding = self.monitor.holding() if self.monitor is not None else []
        return f"{reason} (while: {'; '.join(holding)})" if holding else reason

    def skip(self, reason: str, step: int, epoch: int) -> None:
        """Record a batch left out before it touched the model (nothing to undo)."""
        reason = self._explained(reason)
        self.events.append(
            {"step": step, "epoch": epoch, "reason": reason, "lr_scale": self.lr_scale}
        )

    def recover(self, reason: str, step: int, epoch: int, to: tuple | None = None) -> None:
        """Undo back to the last snapshot (or ``to``) at a lower rate, or stop the run there."""
        self.recoveries += 1
        self.epoch_recoveries += 1
        self.undone += 1
        reason = self._explained(reason)
        again = self.lr_scale < self.lr_ceiling  # failed although already backed off
        self.lr_scale *= self.lr_backoff
        if again:  # never double back to a rate that failed twice
            self.lr_ceiling = self.lr_scale
        self.events.append(
            {"step": step, "epoch": epoch, "reason": reason, "lr_scale": self.lr_scale}
        )
        if (to or self._snapshot) is not None:  # a run that stops keeps its last good state
            self._restore(to or self._snapshot)
        if self.recoveries > self.max_recoveries or self._snapshot is None:
            raise TrainingError(
                f"training diverged at epoch {epoch}, step {step}: {reason}; "
                f"{self.recoveries - 1} recoveries did not help (try a lower --lr or another "
                "--quantizer)"
            )

    def state_dict(self) -> dict[str, Any]:
        """Everything the guard's next decisions depend on, for checkpoints: plain Python,
        but `snapshot` and `anchor` (the best epoch's), `(model_state, optimizer_state)`."""
        return {
            "lr_ceiling": self.lr_ceiling,
            "epoch_recoveries": self.epoch_recoveries,
            "best_val": self.best_val,
            "untrained_val": self.untrained_val,
            "undone": self.undone,
            "anchor": self._anchor,
            "losses": list(self.losses),
            "norms": list(self.norms),
            "inputs": list(self.inputs),
            "lr_scale": self.lr_scale,
            "recoveries": self.recoveries,
            "clean_steps": self.clean_steps,
            "events": [dict(e) for e in self.events],
            "snapshot": self._snapshot,
            "steps": self.steps,
            "epoch": self.epoch,
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
            "stopping": None if self.stopping is None else self.stopping.state_dict(),
            "best": None if self.stopping is None else self.stopping.best_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` gave (snapshot tensors on the model's device)."""
        self.losses = deque(state["losses"], maxlen=self.window)
        self.norms = deque(state["norms"], maxlen=self.window)
        self.inputs = deque(state["inputs"], maxlen=self.window)
        self.lr_scale, self.recoveries = state["lr_scale"], state["recoveries"]
        self.clean_steps, self.events = state["clean_steps"], list(state["events"])
        self._snapshot, self._anchor = state["snapshot"], state["anchor"]
        self.lr_ceiling, self.best_val = state["lr_ceiling"], state["best_val"]
        self.epoch_recoveries = state["epoch_recoveries"]
        self.untrained_val, self.undone = state["untrained_val"], state["undone"]
        self.steps, self.epoch = state.get("steps", 0), state.get("epoch", 0)
        if self.monitor is not None and state.get("monitor") is not None:
            self.monitor.load_state_dict(state["monitor"])
        if self.stopping is not None and state.get("stopping") is not None:
            self.stopping.load_state_dict(state["stopping"])
            self.stopping.best_state = state.get("best")
