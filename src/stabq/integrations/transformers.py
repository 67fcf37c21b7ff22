"""Hugging Face `transformers.Trainer` callbacks: stabq's codebook health and stability guard.

    trainer = GuardedTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                             callbacks=[CodebookHealthCallback(), GuardCallback()])

`CodebookHealthCallback` finds the quantizers in the Trainer's model (stabq's, or
vector-quantize-pytorch's `VectorQuantize`, `ResidualVQ`, `FSQ` and kin), watches each
with a `stabq.CollapseMonitor` (its alerts come as `stabq.CollapseWarning`) and puts the
figures of `stabq.integrations.lightning.CodebookHealth` into the Trainer's own logs, so
`trainer.state.log_history` and every `report_to` backend get them: with each training
log `codebook/<module>/<figure>`, over the monitor's window; with each evaluation's log
`<prefix>_codebook/<module>/<figure>`, over every row evaluated on every process, where
`<prefix>` is the evaluation's metric prefix (`eval`, as in `eval_loss`).

`GuardCallback` runs `stabq.StabilityGuard`: a batch that `admit` refuses is never run,
a non-finite gradient is never stepped, and a step whose loss or feature norm is bad is
undone (the guard's snapshot back) at a lower rate, while the Trainer's scheduler keeps
owning the rate. It logs `guard/events` and `guard/lr_scale`.

Why `GuardedTrainer` (or `attach`): the Trainer calls its reporting callbacks before
those passed to it, so figures added to the logs in `on_log` would reach no backend;
and callbacks see neither a batch nor the optimiser the Trainer makes.

Needs `pip install 'stabq[transformers]'` (else importing this raises a `ConfigError`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stabq import distributed
from stabq.errors import ConfigError
from stabq.health.monitor import CollapseMonitor
from stabq.health.usage import CodebookUsage
from stabq.integrations.common import _figures, count_eval_codes, find_quantizers, float_input
from stabq.training.guard import StabilityGuard, global_grad_norm, largest_row_norm

try:
    import transformers
    from transformers.trainer_callback import DefaultFlowCallback, TrainerCallback
except ImportError as error:  # pragma: no cover - the extra is installed in the tests
    raise ConfigError(
        "stabq.integrations.transformers needs the transformers package: "
        "pip install 'stabq[transformers]'"
    ) from error


def _eval_prefix(logs: Mapping[str, Any]) -> str | None:
    """The metric prefix of an evaluation's log (`eval` from `eval_runtime`), else None."""
    found = [k[: -len("_runtime")] for k in logs if k.endswith("_runtime")]
    return next((prefix for prefix in found if prefix != "train"), None)


class _LogsFigures(TrainerCallback):
    """A callback that adds figures to the Trainer's logs; `attach` gives it the Trainer."""

    trainer: Any = None

    def set_trainer(self, trainer: transformers.Trainer) -> None:
        self.trainer = trainer

    @staticmethod
    def _add(state: Any, logs: dict, figures: Mapping[str, float]) -> None:
        logs.update(figures)
        if state.log_history and set(logs) - set(figures) <= set(state.log_history[-1]):
            state.log_history[-1].update(figures)  # Trainer.log copied `logs` there already

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        name, group = type(self).__name__, distributed.is_distributed() and dist.get_backend()
        if self.trainer is None and args.report_to:
            raise ConfigError(
                f"{name}: with report_to={args.report_to} it must come before the reporting "
                "callbacks: use stabq.integrations.transformers.GuardedTrainer or attach()"
            )
        if group and "gloo" not in str(group):  # stabq agrees its figures as CPU tensors
            raise ConfigError(f"{name} needs a process group with gloo (CPU tensors), not {group}")


def attach(trainer: transformers.Trainer, *callbacks: TrainerCallback) -> None:
    """Put stabq's callbacks into a Trainer ahead of its reporting callbacks, and give them
    the Trainer (moving any that it holds already).

    Args:
        trainer: a `transformers.Trainer` (or subclass).
        *callbacks: `CodebookHealthCallback`s and `GuardCallback`s.

    Examples:
        >>> import stabq, torch, transformers
        >>> from stabq.integrations.transformers import CodebookHealthCallback, attach
        >>> args = transformers.TrainingArguments("out", use_cpu=True, report_to="tensorboard")
        >>> trainer = transformers.Trainer(torch.nn.Sequential(stabq.FSQ([5, 5])), args)
        >>> health = CodebookHealthCallback()
        >>> attach(trainer, health)
        >>> [type(c).__name__ for c in trainer.callback_handler.callbacks][:3]
        ['DefaultFlowCallback', 'CodebookHealthCallback', 'TensorBoardCallback']
    """
    handler = trainer.callback_handler.callbacks
    handler[:] = [c for c in handler if not any(c is callback for callback in callbacks)]
    at = next((i + 1 for i, c in enumerate(handler) if isinstance(c, DefaultFlowCallback)), 0)
    handler[at:at] = callbacks
    for callback in callbacks:
        callback.set_trainer(trainer)


class CodebookHealthCallback(_LogsFigures):
    """A Trainer callback that adds each quantizer's codebook health to the training and
    evaluation logs.

    Args:
        modules: module paths of the quantizers to watch (default None: all found).
        prefix: the first part of every training figure's name (evaluation figures get
            the evaluation's metric prefix before it: `eval_codebook/...`).
        window: steps the training figures cover (each `CollapseMonitor`'s).
        check_every: steps between the monitors' checks.
        warn: issue the monitors' alerts as `CollapseWarning`s.
        **monitor_kwargs (Any): more options of each `CollapseMonitor`.

    Raises:
        ConfigError: (when the Trainer is made) no quantizer found, or a name in
            `modules` that is not one; (when training starts) `report_to` set while the
            callback comes after the reporting callbacks (see `attach`), or a process
            group without gloo (stabq sums its counts as CPU tensors).

    Examples:
        >>> from stabq.integrations.transformers import CodebookHealthCallback
        >>> health = CodebookHealthCallback(window=100)  # GuardedTrainer(callbacks=[health])
        >>> health.monitor_kwargs["window"], health.prefix
        (100, 'codebook')
    """

    def __init__(
        self,
        modules: Sequence[str] | None = None,
        *,
        prefix: str = "codebook",
        window: int = 200,
        check_every: int = 50,
        warn: bool = True,
        **monitor_kwargs: Any,
    ) -> None:
        self.names, self.prefix = modules, prefix
        self.monitor_kwargs = dict(window=window, check_every=check_every, warn=warn)
        self.monitor_kwargs.update(monitor_kwargs)
        self.monitors: dict[str, CollapseMonitor] = {}
        self.eval_usage: dict[str, CodebookUsage] = {}
        self._handles: list[Any] = []
        self._model: nn.Module | None = None

    def set_trainer(self, trainer: transformers.Trainer) -> None:
        self.trainer = trainer
        self.watch(trainer.model)

    def watch(self, model: nn.Module) -> None:
        """Watch `model`'s quantizers (what the Trainer's start does; again: no-op)."""
        if model is self._model:
            return
        self.detach()
        for name, module in find_quantizers(model, self.names).items():
            monitor = CollapseMonitor(module, training_only=True, **self.monitor_kwargs)
            self.monitors[name] = monitor
            usage = CodebookUsage(monitor.codebook_size, monitor.num_codebooks, grid=monitor.grid)
            self.eval_usage[name] = usage  # sync: compute() sums over the processes
            self._handles.append(module.register_forward_hook(count_eval_codes(usage)))
        self._model = model

    def detach(self) -> None:
        """Stop watching: remove every hook (the figures so far stay readable)."""
        for monitor in self.monitors.values():
            monitor.detach()
        for handle in self._handles:
            handle.remove()
        self.monitors, self.eval_usage, self._handles, self._model = {}, {}, [], None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.watch(kwargs["model"])

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        self.watch(self.trainer.model if self.trainer else kwargs["model"])  # model_init's
        self._reset()

    def _reset(self, *_: Any, **__: Any) -> None:
        for usage in self.eval_usage.values():
            usage.reset()

    on_step_end = on_predict = _reset  # an evaluation's forward calls come after them

    def on_log(self, args: Any, state: Any, control: Any, logs: dict, **kwargs: Any) -> None:
        evaluation = _eval_prefix(logs)
        figures = {}
        if evaluation is not None:
            for name, usage in self.eval_usage.items():  # counted over every process's rows
                found = _figures(usage.compute()).items()
                figures.update({f"{evaluation}_{self.prefix}/{name}/{k}": v for k, v in found})
            self._reset()
        elif "loss" in logs:
            for name, monitor in self.monitors.items():
                found = _figures(monitor.report()).items()
                figures.update({f"{self.prefix}/{name}/{k}": v for k, v in found})
        self._add(state, logs, figures)


def _refuse(trainer: Any) -> None:
    """Raise `ConfigError` for a Trainer set up in a way that `GuardCallback` cannot guard."""
    if not isinstance(trainer, GuardedTrainer):
        raise ConfigError(
            "GuardCallback needs stabq.integrations.transformers.GuardedTrainer (a Trainer's "
            "callbacks never see its batches)"
        )
    args = trainer.args
    checks = [
        (args.gradient_accumulation_steps != 1, "gradient_accumulation_steps=1, "
         f"not {args.gradient_accumulation_steps}"),
        (args.fp16, "no fp16 GradScaler (fp16=False; bf16 is fine)"),
        (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled, "neither DeepSpeed nor FSDP"),
        (args.n_gpu > 1, f"one device per process (DistributedDataParallel), not {args.n_gpu}"),
        (trainer.compute_loss_func is not None or args.label_smoothing_factor != 0,
         "the model's own loss (no compute_loss_func, label_smoothing_factor=0)"),
    ]  # fmt: skip
    for failed, needs in checks:
        if failed:
            raise ConfigError(f"GuardCallback needs {needs}")


class GuardCallback(_LogsFigures):
    """A Trainer callback that runs `stabq.StabilityGuard`; it needs `GuardedTrainer`.

    Under a `GuardedTrainer` each batch goes to `admit` first (its inputs as `input`
    picks them); a refused one is never run, its loss NaN (the Trainer's
    `logging_nan_inf_filter` leaves it out of the logged loss). A non-finite gradient
    norm (after the Trainer's clipping) drops every gradient before the optimiser step,
    and the guard's snapshot comes back at a lower rate; after each step the model's
    loss (`outputs.loss`) and the largest norm at the quantizers' inputs are reviewed,
    and a bad step is undone likewise. The guard's rate scale multiplies the rates only
    during `optimizer.step()`, so the Trainer's scheduler keeps setting them.

    Args:
        input: picks the inputs to check out of a batch (default None: `float_input`,
            the first float tensor; a batch of token ids alone is not checked).
        **guard_kwargs (Any): the guard's options (`spike_factor`, `window`, ...).

    Raises:
        ConfigError: (when training starts) a Trainer that is not a `GuardedTrainer`,
            gradient accumulation, fp16 (its GradScaler), DeepSpeed, FSDP,
            `torch.nn.DataParallel` over several GPUs, `compute_loss_func` or label
            smoothing (the trained loss is not the model's), a process group without
            gloo; (at a step) a model that returns no loss.
        TrainingError: more recoveries than the guard's `max_recoveries` allows.

    Examples:
        >>> from stabq.integrations.transformers import GuardCallback
        >>> guard = GuardCallback(spike_factor=20.0, window=100)
        >>> guard.guard is None  # GuardedTrainer(callbacks=[guard]) makes it when training starts
        True
    """

    def __init__(self, input: Callable[[Any], Tensor | None] | None = None, **guard_kwargs: Any):
        self.input = input or float_input
        self.guard_kwargs = guard_kwargs
        self.guard: StabilityGuard | None = None
        self._handles: list[Any] = []
        self._norm, self._loss, self._reason, self._held, self._rates = 0.0, None, None, None, []
        self._epoch = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        _refuse(self.trainer)
        model, optimizer = self.trainer.model, self.trainer.optimizer
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper's own
        self.guard = StabilityGuard(model, optimizer, **self.guard_kwargs)
        self._handles = [model.register_forward_hook(self._take_loss)]
        for module in find_quantizers(model).values():
            self._handles.append(module.register_forward_pre_hook(self._feature_norm))

    @torch.compiler.disable
    def _take_loss(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            loss = output.get("loss") if isinstance(output, Mapping) else None  # ModelOutput too
            self._loss = None if loss is None else loss.detach()

    @torch.compiler.disable
    def _feature_norm(self, module: nn.Module, args: tuple) -> None:
        if module.training and args and isinstance(args[0], Tensor):
            self._norm = max(self._norm, largest_row_norm(args[0]))

    def admit(self, batch: Any, state: Any) -> bool:
        """Whether to run this batch (`GuardedTrainer.training_step` asks before each).

        Args:
            batch: the Trainer's batch.
            state: the Trainer's `TrainerState` (its step goes into an event).

        Returns:
            True to run it; False: left out, the reason in the guard's `events`.
        """
        self._norm, self._loss, self._reason, self._held = 0.0, None, None, None
        x = self.input(batch)
        if x is None or self.guard.admit(x, step=state.global_step, epoch=self._epoch):
            return True
        self._reason, self._held = "left out", self.guard.hold()
        return False

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch, self._events_before = int(state.epoch or 0), len(self.guard.events)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = self.guard.model, self.guard.optimizer
        if self._reason is None and self.guard.enabled:
            norm = global_grad_norm(model)
            if not bool(torch.isfinite(norm)):
                self._reason = f"gradient norm is {float(norm)}"
        if self._reason is not None:  # the optimiser steps over no gradient: nothing moves
            for p in model.parameters():
                p.grad = None
        self._rates = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.guard.lr_scale

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for group, rate in zip(self.guard.optimizer.param_groups, self._rates, strict=True):
            group["lr"] = rate  # the scheduler's, as it set it
        at = {"step": state.global_step, "epoch": self._epoch}
        if self._held is not None:
            self.guard.put_back(self._held)
        elif self._reason is not None:
            self.guard.recover(self._reason, **at)
        elif self._loss is None:
            raise ConfigError(
                "GuardCallback needs the model to return its loss (outputs.loss or "
                "outputs['loss']); it returned none"
            )
        else:
            self.guard.review(self._loss, self._norm, **at)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.guard.end_epoch(len(self.guard.events) > self._events_before, None, self._epoch)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict, **kwargs: Any) -> None:
        if "loss" in logs and self.guard is not None:
            figures = {"guard/events": float(len(self.guard.events))}
            self._add(state, logs, {**figures, "guard/lr_scale": self.guard.lr_scale})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class GuardedTrainer(transformers.Trainer):
    """A `transformers.Trainer` that runs stabq's callbacks as they need: first among its
    callbacks (so its reporting backends get their figures) and, for a `GuardCallback`,
    each batch shown to the guard before it runs.

    A Trainer's callbacks never see a batch, so a callback alone cannot keep a refused
    one from running; this subclass changes `training_step` only (and puts stabq's
    callbacks first, as `attach` does). Combine it with another Trainer subclass by
    inheriting from both, this one first.

    Args:
        *args (Any): the `transformers.Trainer`'s.
        **kwargs (Any): likewise; `callbacks=[CodebookHealthCallback(), GuardCallback()]`.

    Examples:
        >>> import stabq, torch, transformers
        >>> from stabq.integrations.transformers import GuardCallback, GuardedTrainer
        >>> args = transformers.TrainingArguments("out", use_cpu=True, report_to="none")
        >>> trainer = GuardedTrainer(torch.nn.Sequential(stabq.FSQ([5, 5])), args,
        ...                          callbacks=[GuardCallback()])
        >>> trainer.guard_callback.trainer is trainer
        True
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ours = [c for c in self.callback_handler.callbacks if isinstance(c, _LogsFigures)]
        attach(self, *ours)

    @property
    def guard_callback(self) -> GuardCallback | None:
        """The `GuardCallback` among the callbacks, or None."""
        found = (c for c in self.callback_handler.callbacks if isinstance(c, GuardCallback))
        return next(found, None)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        """The Trainer's step, once the guard (if any) admits the batch; else a NaN loss."""
        guard = self.guard_callback
        if guard is not None and not guard.admit(inputs, self.state):
            return torch.tensor(float("nan"), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)


__all__ = ["CodebookHealthCallback", "GuardCallback", "GuardedTrainer", "attach", "float_input"]
