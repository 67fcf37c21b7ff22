"""PyTorch Lightning callbacks: stabq's codebook health and stability guard.

    trainer = lightning.Trainer(callbacks=[CodebookHealth(), GuardCallback()])

`CodebookHealth` finds the quantizers in the LightningModule (stabq's, or
vector-quantize-pytorch's `VectorQuantize`, `ResidualVQ`, `FSQ` and kin), watches each
with a `stabq.CollapseMonitor` and logs its figures through `pl_module.log`, so any
Lightning logger gets them: `codebook/<module>/<figure>` every `log_every_n_steps`
training steps (over the monitor's window) and `val_codebook/<module>/<figure>` per
validation epoch (over all validation rows, on every rank). The figures, as
`stabq.CodebookUsage` defines them: usage, fill, codes_used, perplexity, dead_codes
(not for grids), entropy_bits, top_codes, aux_loss, feature_norm, saturation (FSQ), and
`<figure>/<k>` per codebook when there are several. Each monitor's alerts (collapse,
saturation, a Gumbel temperature that nothing anneals, ...) come as
`stabq.CollapseWarning`, once each.

`GuardCallback` runs `stabq.StabilityGuard` under automatic optimisation: a batch that
`admit` refuses leaves no trace (its gradients are dropped and the state before it is
put back), a non-finite gradient is never stepped, and a step whose loss or feature
norm is bad is undone afterwards at a lower rate (`review`). Its rate scale applies
only while the optimiser steps, so schedulers keep owning the rate. It logs
`guard/events` and `guard/lr_scale`.

Needs the `lightning` package: `pip install 'stabq[lightning]'`; without it, importing
this module raises a `ConfigError` saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stabq.errors import ConfigError
from stabq.health.monitor import CollapseMonitor
from stabq.health.usage import CodebookUsage
from stabq.integrations.common import (
    FIGURES,
    PEER_CLASSES,
    PER_CODEBOOK,
    _figures,
    count_eval_codes,
    find_quantizers,
    first_tensor,
    is_quantizer,
)
from stabq.training.guard import StabilityGuard, global_grad_norm, largest_row_norm

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - the extra is installed in the tests
    raise ConfigError(
        "stabq.integrations.lightning needs the lightning package: pip install 'stabq[lightning]'"
    ) from error


class CodebookHealth(pl.Callback):
    """A Lightning callback that logs each quantizer's codebook health, training and validation.

    Args:
        modules: module paths of the quantizers to watch (default None: all found).
        every_n_steps: log training figures this often (default None: the trainer's
            `log_every_n_steps`).
        prefix: the first part of every logged name.
        window: steps the training figures cover (each `CollapseMonitor`'s).
        check_every: steps between the monitors' checks.
        warn: issue the monitors' alerts as `CollapseWarning`s.
        **monitor_kwargs (Any): more options of each `CollapseMonitor`
            (`unannealed_steps=` and the other thresholds).

    Raises:
        ConfigError: (when the trainer sets it up) no quantizer found, or a name in
            `modules` that is not one.

    Examples:
        >>> from stabq.integrations.lightning import CodebookHealth
        >>> health = CodebookHealth(every_n_steps=10, window=100)
        >>> health.monitor_kwargs["window"], health.prefix  # lightning.Trainer(callbacks=[health])
        (100, 'codebook')
    """

    def __init__(
        self,
        modules: Sequence[str] | None = None,
        *,
        every_n_steps: int | None = None,
        prefix: str = "codebook",
        window: int = 200,
        check_every: int = 50,
        warn: bool = True,
        **monitor_kwargs: Any,
    ) -> None:
        self.names, self.every_n_steps, self.prefix = modules, every_n_steps, prefix
        self.monitor_kwargs = dict(window=window, check_every=check_every, warn=warn)
        self.monitor_kwargs.update(monitor_kwargs)
        self.monitors: dict[str, CollapseMonitor] = {}
        self.val_usage: dict[str, CodebookUsage] = {}
        self._handles: list[Any] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.teardown(trainer, pl_module, stage)
        for name, module in find_quantizers(pl_module, self.names).items():
            monitor = CollapseMonitor(module, training_only=True, **self.monitor_kwargs)
            self.monitors[name] = monitor
            usage = CodebookUsage(monitor.codebook_size, monitor.num_codebooks, grid=monitor.grid)
            usage.sync = torch.distributed.is_available() and torch.distributed.is_initialized()
            self.val_usage[name] = usage
            self._handles.append(module.register_forward_hook(count_eval_codes(usage)))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        every = self.every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % max(1, every):
            return
        for name, monitor in self.monitors.items():
            for key, value in _figures(monitor.report()).items():
                pl_module.log(f"{self.prefix}/{name}/{key}", value, on_step=True, on_epoch=False)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for usage in self.val_usage.values():
            usage.reset()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, usage in self.val_usage.items():
            figures = _figures(usage.compute())  # counted over every rank's rows
            if trainer.sanity_checking:
                continue
            for key, value in figures.items():
                pl_module.log(f"val_{self.prefix}/{name}/{key}", value, on_epoch=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for monitor in self.monitors.values():
            monitor.detach()
        for handle in self._handles:
            handle.remove()
        self.monitors, self.val_usage, self._handles = {}, {}, []


class GuardCallback(pl.Callback):
    """A Lightning callback that runs `stabq.StabilityGuard` under automatic optimisation.

    One optimiser, `accumulate_grad_batches=1`. The guard is made when fitting starts.

    Args:
        input: picks the inputs out of a batch (default None: `first_tensor`).
        **guard_kwargs (Any): the guard's options (`spike_factor`, `window`, ...).

    Raises:
        ConfigError: (when fitting starts) manual optimisation, several optimisers or
            `accumulate_grad_batches` other than 1; a batch whose inputs cannot be found.

    Examples:
        >>> from stabq.integrations.lightning import GuardCallback
        >>> guard = GuardCallback(spike_factor=20.0, window=100)
        >>> guard.guard is None  # lightning.Trainer(callbacks=[guard]) makes it at fit
        True
    """

    def __init__(self, input: Callable[[Any], Tensor] | None = None, **guard_kwargs: Any) -> None:
        self.input = input or first_tensor
        self.guard_kwargs = guard_kwargs
        self.guard: StabilityGuard | None = None
        self._handles: list[Any] = []
        self._norm, self._reason, self._held, self._rates = 0.0, None, None, []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ConfigError(
                "GuardCallback needs automatic optimisation; with manual optimisation call "
                "stabq.StabilityGuard's admit(x) and step(loss) in training_step"
            )
        if trainer.accumulate_grad_batches != 1 or len(trainer.optimizers) != 1:
            raise ConfigError(
                "GuardCallback needs one optimiser and accumulate_grad_batches=1 "
                f"(found {len(trainer.optimizers)} and {trainer.accumulate_grad_batches})"
            )
        optimizer = trainer.optimizers[0]
        self.guard = StabilityGuard(pl_module, optimizer, **self.guard_kwargs)
        self._handles = [
            optimizer.register_step_pre_hook(self._scale_rates),
            optimizer.register_step_post_hook(self._restore_rates),
        ]
        for module in find_quantizers(pl_module).values():
            self._handles.append(module.register_forward_pre_hook(self._feature_norm))

    @torch.compiler.disable  # a compiled module would compile its hooks too: keep eager
    def _feature_norm(self, module: nn.Module, args: tuple) -> None:
        if module.training and args and isinstance(args[0], Tensor):
            self._norm = max(self._norm, largest_row_norm(args[0]))

    def _scale_rates(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._rates = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.guard.lr_scale

    def _restore_rates(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for group, rate in zip(optimizer.param_groups, self._rates, strict=True):
            group["lr"] = rate

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._norm, self._reason, self._held = 0.0, None, None
        at = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        if not self.guard.admit(self.input(batch), **at):
            self._reason, self._held = "left out", self.guard.hold()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._reason is None and self.guard.enabled:
            norm = global_grad_norm(pl_module)
            if not bool(torch.isfinite(norm)):
                self._reason = f"gradient norm is {float(norm)}"
        if self._reason is not None:  # the optimiser steps over no gradient: nothing changes
            for p in pl_module.parameters():
                p.grad = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        at = {"step": trainer.global_step - 1, "epoch": trainer.current_epoch}
        if self._held is not None:  # the forward pass may have moved EMA buffers: put back
            self.guard.put_back(self._held)
        elif self._reason is not None:
            self.guard.recover(self._reason, **at)
        else:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if loss is not None:
                self.guard.review(loss, self._norm, **at)
        pl_module.log("guard/events", float(len(self.guard.events)), on_step=True)
        pl_module.log("guard/lr_scale", self.guard.lr_scale, on_step=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._events_before = len(self.guard.events)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.guard.end_epoch(
            len(self.guard.events) > self._events_before, None, trainer.current_epoch
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


__all__ = [
    "FIGURES",
    "PEER_CLASSES",
    "PER_CODEBOOK",
    "CodebookHealth",
    "GuardCallback",
    "find_quantizers",
    "first_tensor",
    "is_quantizer",
]
