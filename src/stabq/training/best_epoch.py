"""Going back to the best epoch: what a guard does when undoing single steps is not enough.

Undoing single steps cannot help when the rate is so high that the weights
decay for many steps before anything jumps: the snapshots are then spoilt
too. So the guard also keeps the state of the best epoch (lowest validation
loss; the untrained model to start with). An epoch goes back to the best
at an 8x lower rate, capped there, when it needed undoing and ends no better
than the best, or when it was calm but the run needed undoing earlier and
the model is still no better than chance (its units dead). An epoch no better
than chance is never the best one to go back to, and a run that needed undoing
and ends no better than chance stops with an error.

:class:`BestEpoch` holds these epoch-level rules; :class:`~stabq.training.guard.StabilityGuard`
inherits them and supplies the state they act on (``_copy``, ``recover``, the rate
scale and ceiling, the counters).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stabq.errors import TrainingError


def finite_state(model: torch.nn.Module) -> bool:
    """Whether every floating-point weight and buffer of ``model`` is finite."""
    found = [t.detach() for t in model.state_dict().values() if t.is_floating_point()]
    found = [t for t in found if t.numel()]
    if not found:
        return True
    # the largest |value| of each tensor, in two calls: NaN where one is NaN, inf where one
    # is infinite, so finite exactly when every value is
    foreach_max = getattr(torch, "_foreach_max", None)  # torch 2.4 on; before, one a tensor
    absolute = torch._foreach_abs(found)
    largest = foreach_max(absolute) if foreach_max else [t.max() for t in absolute]
    if len({(t.dtype, t.device) for t in largest}) > 1:  # one dtype and device to stack
        largest = [t.float().to(found[0].device) for t in largest]
    return bool(torch.stack(largest).isfinite().all())  # one device sync


def cloned(value: Any) -> Any:
    """``value`` with every tensor in it cloned (dicts and lists rebuilt, other values kept):
    a deep copy of a state dict at the cost of its tensors' copies."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: cloned(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(cloned(v) for v in value)
    return value


class BestEpoch:
    """The epoch-level half of the stability guard (see the module docstring)."""

    def prime(
        self, loss: float, feature_norm: float, input_norm: float, val_loss: float, chance: float
    ) -> None:
        """First references: the untrained model's figures on clean rows, and its state.

        ``chance`` is the validation loss of always predicting the class frequencies.
        """
        if all(map(math.isfinite, (loss, feature_norm, input_norm))):
            self.losses.append(loss)
            self.norms.append(feature_norm)
            self.inputs.append(input_norm)
        if self.enabled:
            self.best_val, self._anchor = val_loss, self._copy()
            self.untrained_val = 0.995 * min(val_loss, chance)  # barely better is no better

    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch a new optimiser (stage 2): the current state is the snapshot and the best."""
        self.optimizer = optimizer
        self.snapshot()
        self.best_val = self.untrained_val = math.inf
        self._anchor = self._snapshot

    def require_progress(self, applied: int, epoch: int) -> None:
        """Stop the run when no step of an epoch could be applied (every batch bad)."""
        if self.enabled and applied == 0:
            last = self.events[-1]["reason"] if self.events else "no batch"
            raise TrainingError(
                f"training stopped at epoch {epoch}: no batch of the epoch could be used "
                f"(last: {last}); check the data, or try a lower --lr"
            )

    def require_learned(self, val_loss: float) -> None:
        """Stop a run that needed undoing and ends no better than chance: a wrecked model is
        never handed back as if trained."""
        if self.enabled and self.undone and not val_loss < self.untrained_val:
            raise TrainingError(
                f"training ended no better than chance: validation loss {val_loss:.4g} "
                f"(chance {self.untrained_val:.4g}) after {self.undone} undone steps; try a "
                f"lower --lr or another --quantizer"
            )

    def end_epoch(self, had_events: bool, val_loss: float | None = None, epoch: int = -1) -> bool:
        """Keep the best epoch, or go back to it; a clean epoch forgives earlier recoveries.

        Returns True when the model went back to the best epoch's state.
        """
        back = False
        if self.enabled and val_loss is not None:
            worse = self.epoch_recoveries and not val_loss < self.best_val
            # units killed earlier: a calm epoch that still ends no better than chance
            dead = self.undone and not self.epoch_recoveries and not val_loss < self.untrained_val
            if (worse or dead) and self._anchor is not None:
                # a lost epoch: the rate is far too high, cut it 8x and cap it there
                target = min(self.lr_scale, self.lr_ceiling) * self.lr_backoff**3
                self.recover(
                    f"epoch ended with validation loss {val_loss:.4g} (best {self.best_val:.4g}, "
                    f"no better than chance {self.untrained_val:.4g}) after {self.undone} "
                    f"undone steps: back to the best epoch at a rate capped lower",
                    step=-1,
                    epoch=epoch,
                    to=self._anchor,
                )
                self.lr_scale = self.lr_ceiling = target
                self.events[-1]["lr_scale"] = target
                self._snapshot = self._anchor
                back = True
            elif val_loss < self.best_val and val_loss < self.untrained_val:
                # no better than chance is no anchor: going back to a model with dead units
                # at ever lower rates would only keep it dead (the untrained one can learn)
                self.best_val, self._anchor = val_loss, self._copy()
        self.epoch_recoveries = 0
        self.epoch += 1
        if not had_events and not back:
            self.recoveries = 0
        return back
