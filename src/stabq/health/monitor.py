"""Early, plain-worded warnings of codebook collapse, loss blow-up and FSQ saturation
(:class:`CollapseMonitor` says what it tests); the mechanisms it also names are in
:mod:`stabq.health.mechanisms`, the Gumbel temperature's check in :mod:`stabq.health.tau`.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stabq.errors import ShapeError, check, check_int, check_number
from stabq.health.alerts import Alert, CollapseWarning
from stabq.health.mechanisms import Mechanisms
from stabq.health.probe import (
    caller_level,
    codebook_shape,
    codes_carrying,
    first_input,
    fraction,
    gather,
    is_grid_module,
    percent,
    read_output,
    target,
)
from stabq.health.tau import UNANNEALED_STEPS, TauWatch
from stabq.health.usage import CodebookUsage
from stabq.health.window import (
    Pending,
    Step,
    kept_bytes,
    loss_value,
    require_fit,
    tally,
    window_figures,
    window_full,
)

LOSS_FLOOR = 1e-8  # a loss baseline below this counts as this: growth from ~0 is not alarming


class CollapseMonitor:
    """Watch a quantizer through a forward hook and warn, in plain words, when it starts to fail.

    It keeps the last `window` forward calls ("steps") and every `check_every` steps
    tests, over them: collapse (at most `collapse_codes` codes carry `top_fraction` of
    the assignments), loss growth (the median auxiliary loss of the last `check_every`
    steps above `loss_growth` x the lowest such median so far; a non-finite loss warns
    at once), FSQ saturation (a `saturation` share of the per-dimension levels at a
    bound) and a Gumbel temperature that nothing anneals; it also names mechanisms
    (codes lagging or blown up, a sum-reduced loss, fp16 overflow; grid dimensions
    stuck at one level or moving together; a SimVQ map near singular).
    Each condition alerts once when it starts to hold, and again only after it cleared.
    A step's figures are computed with those of the steps around it, at a check or when
    alerts or figures are read; each alert names its step. Usage figures are
    `CodebookUsage`'s over the window. It sees only this process's forward calls.

    Args:
        module: any module returning code indices: stabq's quantizers,
            vector-quantize-pytorch's VectorQuantize / ResidualVQ / FSQ, a
            `BottleneckClassifier` or your own. Attached at once; `detach()` or a
            `with` block ends it.
        codebook_size: codes per codebook; default `module.codebook_size`.
        num_codebooks: size of the indices' trailing codebook axis; default from the
            module (stabq `num_codebooks` with `multi_codebook`, vector-quantize-pytorch
            `num_quantizers`), else 1.
        levels: FSQ levels, to measure saturation; default `module.levels` or
            `module._levels` when their product is `codebook_size`.
        window: steps (forward calls) the figures cover, an integer >= 1.
        check_every: steps between checks, an integer >= 1.
        min_samples: assignments per codebook in the window before collapse and
            saturation are judged.
        top_fraction: share of assignments that defines the codes "carrying" them.
        collapse_codes: collapse when at most this many codes carry `top_fraction`;
            default 1% of the codebook, at least 2, at most 10 (a classifier may
            honestly use about one code per class).
        loss_growth: warn when the aux loss exceeds this multiple of its lowest level.
        saturation: warn when this fraction of FSQ values sits at a bound level.
        unannealed_steps: warn when a Gumbel quantizer's tau is still its `tau_start`
            after this many training forwards.
        callback: called with each `Alert`.
        warn: also issue each alert as a `CollapseWarning`.
        training_only: record only forward calls in training mode.

    Raises:
        ConfigError: `module` is not an `nn.Module`, its codebook size cannot be found,
            or an option is out of range.
        ShapeError: (at a forward) indices that do not fit `num_codebooks` or are >=
            `codebook_size`.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.VectorQuantizer(8, codebook_size=64)
        >>> alerts = []
        >>> monitor = stabq.CollapseMonitor(q, check_every=5, min_samples=16, warn=False,
        ...                                 callback=alerts.append)
        >>> for _ in range(5):
        ...     _ = q(torch.zeros(32, 8))  # every input alike: one code takes them all
        >>> print(alerts[0])
        collapse: 1 of 64 codes carry 95% of assignments (perplexity 1.0) over the last 5 steps
        >>> monitor.report()["top_codes"]
        1
        >>> monitor.detach()
    """

    def __init__(
        self,
        module: nn.Module,
        codebook_size: int | None = None,
        num_codebooks: int | None = None,
        *,
        levels: Sequence[int] | None = None,
        window: int = 200,
        check_every: int = 50,
        min_samples: int = 256,
        top_fraction: float = 0.95,
        collapse_codes: int | None = None,
        loss_growth: float = 1e4,
        saturation: float = 0.99,
        unannealed_steps: int = UNANNEALED_STEPS,
        callback: Callable[[Alert], Any] | None = None,
        warn: bool = True,
        training_only: bool = False,
    ) -> None:
        name = type(self).__name__
        check(isinstance(module, nn.Module), f"{name}: module={module!r} is not a torch.nn.Module")
        self._target = q = target(module)  # the quantizer the hook reads
        self.codebook_size, self.num_codebooks, self.levels = codebook_shape(
            q, name, codebook_size, num_codebooks, levels
        )
        self.grid = is_grid_module(q, self.levels)  # no dead codes in its figures
        self._levels = None if self.levels is None else torch.tensor(self.levels)
        self.window = check_int(name, "window", window, 1)
        self.check_every = check_int(name, "check_every", check_every, 1)
        self.min_samples = check_int(name, "min_samples", min_samples, 1)
        self.top_fraction = fraction(name, "top_fraction", top_fraction)
        default_codes = max(2, min(self.codebook_size // 100, 10))
        self.collapse_codes = check_int(
            name, "collapse_codes", default_codes if collapse_codes is None else collapse_codes, 1
        )
        self.loss_growth = check_number(name, "loss_growth", loss_growth, 1)
        self.saturation = fraction(name, "saturation", saturation)
        self.unannealed_steps = check_int(name, "unannealed_steps", unannealed_steps, 1)
        check(
            callback is None or callable(callback),
            f"{name}: callback={callback!r}, allowed is a callable taking an Alert, or None",
        )
        self.callback, self.warn, self.training_only = callback, bool(warn), bool(training_only)
        self.module = module
        self._alerts: list[Alert] = []
        self._handle = None
        self.mechanisms = Mechanisms.of(q, self)
        grid = self.mechanisms.grid
        self._shared = grid is not None and grid.levels == list(self.levels or []) != []
        self.reset()
        self.attach()

    # -- lifecycle ----------------------------------------------------------------

    def attach(self) -> CollapseMonitor:
        """Hook the module's forward (no-op when attached already)."""
        if self._handle is None:
            # a compiled quantizer would compile its hooks too: keep eager. Disabled here,
            # not at class definition, so that importing stabq does not import torch._dynamo
            hook = torch.compiler.disable(self._hook)
            self._handle = self.module.register_forward_hook(hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        """Remove the hook; the figures recorded so far stay readable."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> CollapseMonitor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget the window, the loss baseline and which conditions hold (not ``alerts``)."""
        self.step = 0
        self._steps: deque[Step] = deque(maxlen=self.window)
        self._pending: list[Pending] = []  # steps whose figures are not computed yet
        self._held = 0  # the bytes of the tensors they hold
        self._loss_min: float | None = None
        self._loss_min_step = 0
        self._active: set[str] = set()
        self.mechanisms.reset()
        self._tau = TauWatch(target(self.module), self.unannealed_steps)

    def observe(self, *, task_loss: Tensor | float) -> None:
        """Give the task (classification) loss of the latest step, which the
        `loss_reduction` alert quotes.

        Args:
            task_loss: that loss, a number or 0-dim tensor.
        """
        self.mechanisms.task_loss = float(torch.as_tensor(task_loss).detach())

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, oldest first (the steps kept are judged first)."""
        self._flush()
        return self._alerts

    @alerts.setter
    def alerts(self, value: list[Alert]) -> None:
        self._alerts = value

    def holding(self) -> list[str]:
        """The messages of the alerts whose condition holds now (the latest of each kind)."""
        self._flush()
        latest = {a.kind: a.message for a in self.alerts if a.kind in self._active}
        return list(latest.values())

    def state_dict(self) -> dict[str, Any]:
        """Everything the next alerts depend on, as plain numbers (JSON), for checkpoints."""
        self._flush()
        steps = [[s.bins.tolist(), s.is_counts, *s[2:]] for s in self._steps]
        return {"step": self.step, "steps": steps, "loss_min": self._loss_min,
                "loss_min_step": self._loss_min_step, "active": sorted(self._active),
                "alerts": [list(vars(a).values()) for a in self.alerts],
                "mechanisms": self.mechanisms.state_dict(),
                "tau_steps": self._tau.count}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` gave.

        Args:
            state: a dict from `state_dict`.
        """
        self.reset()
        for bins, is_counts, *scalars in state["steps"]:
            self._steps.append(Step(torch.tensor(bins, dtype=torch.long), is_counts, *scalars))
        self.step, self._loss_min = state["step"], state["loss_min"]
        self._loss_min_step, self._active = state["loss_min_step"], set(state["active"])
        self.alerts = [Alert(*a) for a in state["alerts"]]
        self.mechanisms.load_state_dict(state["mechanisms"])
        self._tau.count = state.get("tau_steps", 0)  # absent in checkpoints of before it

    # -- recording ----------------------------------------------------------------

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.training_only and not module.training:
            return
        indices, loss = read_output(output)
        c, k = self.num_codebooks, self.codebook_size
        check(c == 1 or indices.shape[-1:] == (c,), f"CollapseMonitor: indices of shape "
              f"{tuple(indices.shape)} must end in num_codebooks={c}", ShapeError)  # fmt: skip
        self.step += 1
        self._tau.record()
        x = first_input(args, kwargs)
        value = None if loss is None else loss_value(loss)
        rows = x is not None and x.is_floating_point() and x.dim() > 0 and x.numel() > 0
        entry = Pending(self.step, indices.detach(), value, x.detach() if rows else None,
                        self.mechanisms.capture(self._target, x, output))  # fmt: skip
        if self.step == 1 and bool((indices >= k).any()):  # fail at once on too big an index
            self._pending.append(entry)
            require_fit(int((indices >= k).sum()), k)
        if value is not None:  # one sync a step, so a NaN is reported where it happens
            bad = not math.isfinite(value)
            if bad and "loss_nonfinite" not in self._active:
                self._flush()  # the steps before it are judged first, as they came first
            message = f"commitment loss is {value} at step {self.step}"
            self._set("loss_nonfinite", bad, message, value)
        self._pending.append(entry)
        self._held += kept_bytes(entry)
        due = self.step % self.check_every == 0
        if due or window_full(len(self._pending), self._held):
            self._flush()
        if due:
            self._check()

    def _flush(self) -> None:
        """Compute the figures of the steps kept, add them to the window, judge them."""
        pending, self._pending, self._held = self._pending, [], 0
        if not pending:
            return
        steps, quantized, grid = window_figures(pending, self)
        self._steps.extend(steps)
        kept = [(p.step, p.capture, p.loss, s.norm) for p, s in zip(pending, steps, strict=True)]
        found = self.mechanisms.judge_steps(kept, quantized, grid)
        for step, verdict in found:
            self._set(*verdict, step=step)

    def _tally(self, steps: Sequence[Step]) -> Tensor:
        """Counts ``(num_codebooks, codebook_size)`` over ``steps``; ShapeError on a too big one."""
        return tally(steps, self.num_codebooks, self.codebook_size)

    # -- figures and checks -------------------------------------------------------

    def report(self) -> dict:
        """The current figures, as a dict.

        Over the window: `usage`, `fill`, `codes_used`, `perplexity`, `entropy_bits`,
        `dead_codes`, `samples` and `per_codebook` as `CodebookUsage.compute` gives
        them, `top_codes` (fewest codes carrying `top_fraction`; the lowest over
        codebooks, and per codebook) and `saturation` (FSQ; else None). Over the last
        `check_every` steps: `loss` (median), `input_norm` (mean L2 norm of the first
        input's rows). `loss_baseline` is the lowest such loss median seen,
        `loss_growth` = loss / max(baseline, 1e-8). Also `step`, `window_steps`; None: not measured.
        """
        self._flush()
        steps = list(self._steps)
        usage = CodebookUsage(self.codebook_size, self.num_codebooks, sync=False, grid=self.grid)
        usage.counts = counts = self._tally(steps)
        figures = usage.compute()
        tops = [codes_carrying(row, self.top_fraction) for row in counts]
        for entry, top in zip(figures["per_codebook"], tops, strict=True):
            entry["top_codes"] = top
        recent = steps[-self.check_every :]
        losses = gather([s.loss for s in recent])
        losses = losses[losses.isfinite()] if losses is not None else None
        loss = float(losses.median()) if losses is not None and losses.numel() else None
        norms = gather([s.norm for s in recent])
        norms = norms[norms.isfinite()] if norms is not None else None  # a poisoned batch's
        at_bound, values = gather([s.at_bound for s in steps]), gather([s.values for s in steps])
        base = self._loss_min
        return {
            **figures,
            "step": self.step,
            "window_steps": len(steps),
            "top_codes": min(tops),
            "saturation": None
            if values is None or not values.sum()
            else float(at_bound.sum() / values.sum()),
            "loss": loss,
            "loss_baseline": base,
            "loss_growth": None if None in (loss, base) else loss / max(base, LOSS_FLOOR),
            "input_norm": float(norms.mean()) if norms is not None and norms.numel() else None,
        }

    def _check(self) -> None:
        fig = self.report()
        n, per, sat = fig["window_steps"], fig["per_codebook"], fig["saturation"]
        if fig["samples"] >= self.min_samples:
            worst = min(range(len(per)), key=lambda i: per[i]["top_codes"])
            top, ppl = per[worst]["top_codes"], per[worst]["perplexity"]
            where = f"codebook {worst}, " if self.num_codebooks > 1 else ""
            self._set(
                "collapse",
                top <= self.collapse_codes,
                f"collapse: {top} of {self.codebook_size} codes carry "
                f"{percent(self.top_fraction)} of assignments ({where}perplexity {ppl:.1f}) "
                f"over the last {n} steps",
                top,
            )
            if sat is not None:
                message = f"FSQ saturated: {percent(sat)} of values at the bound"
                self._set(
                    "saturation", sat >= self.saturation, f"{message} over the last {n} steps", sat
                )
        loss, ratio, base = fig["loss"], fig["loss_growth"], self._loss_min
        if ratio is not None:
            self._set(
                "loss_growth",
                ratio > self.loss_growth,
                f"commitment loss grew 10^{math.floor(math.log10(max(ratio, 1)))}x in "
                f"{self.step - self._loss_min_step} steps ({base:.1e} -> {loss:.1e})",
                ratio,
            )
        if loss is not None and (base is None or loss < base):
            self._loss_min, self._loss_min_step = loss, self.step
        if (tau := self._tau.verdict()) is not None:
            self._set(*tau)
        if (found := self.mechanisms.map_verdict) is not None:  # named with the collapse
            kind, holds, message, value = found
            self._set(kind, holds and "collapse" in self._active, message, value)

    def _set(
        self, kind: str, holds: bool, message: str, value: float, step: int | None = None
    ) -> None:
        """Fire ``kind`` when it starts to hold (at ``step``, default the latest); forget it
        when it clears."""
        if not holds or kind in self._active:
            if not holds:
                self._active.discard(kind)
            return
        self._active.add(kind)
        alert = Alert(kind, self.step if step is None else step, message, float(value))
        self._alerts.append(alert)
        if self.warn:
            warnings.warn(alert.message, CollapseWarning, stacklevel=caller_level())
        if self.callback is not None:
            self.callback(alert)


__all__ = ["Alert", "CollapseMonitor", "CollapseWarning", "codes_carrying", "read_output"]
