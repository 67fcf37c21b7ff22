"""Why a quantizer fails, named while it happens: the detectors behind :class:`CollapseMonitor`.

:class:`CollapseMonitor`'s collapse / loss / saturation alerts name symptoms.
These name mechanisms. Each forward call ("step") :class:`Mechanisms` judges
figures of the input ``x`` (rows along the last dim), the output ``q`` (the
quantized rows, ``x``'s shape; straight-through, so its value is the chosen
codes), the auxiliary loss ``a`` and, where the module has one, its code table
``E`` (:func:`code_table`), computed for many steps at once
(:meth:`Mechanisms.capture` keeps a step, :meth:`Mechanisms.judge_steps` judges
the steps kept, in order, each verdict with its step):

    lag                  g = |x|_t / min_{s in window} |x|_s >= LAG_GROWTH (100) and
                         g >= LAG_RATIO (10) x c, where c = the codes' mean norm |q|
                         moved by between that step s and t (up or down).
                         "encoder output norm grew 900x in 200 steps while the
                         codes moved 2x: the codebook lags the encoder"
    codes_blown_up       max_k |E_k| >= BLOWUP (1000) x |x|_t: codes far outside the
                         inputs' reach, before any is chosen (zero-initialised
                         cluster sizes with Laplace smoothing: Sonnet #272)
    blown_code_chosen    max |q| >= BLOWUP x |x|_t: such a code was chosen
    loss_reduction       a / mean((x - q)^2) >= REDUCTION (1000): a mean-reduced
                         commitment is beta x that mean (beta ~ 0.25-2); one summed
                         over a batch of B rows of d values is beta*B*d x it.
                         Judged on single-codebook modules only (a residual
                         quantizer sums its layers' losses against larger
                         residuals than the last), and not on FSQ-like grids,
                         whose loss (FSP's batch moments) is no commitment. The
                         task loss, when given (:meth:`CollapseMonitor.observe`),
                         is quoted as well.
    fp16_overflow        x, q or E in float16, or fp16 autocast on: the largest
                         squared row norm of x, q or E >= 65504 (float16's largest
                         finite value: ``|x|^2 - 2 x.e + |e|^2`` overflows), or
                         finite x gave non-finite q or a

``|x|_t`` is the mean L2 row norm at step t. Grids (FSQ, FSP, residual FSQ, LFQ,
BSQ: ``grid`` or levels known) have bounded codes: lag and blow-up are not judged
there (their failure is saturation, or the grid mechanisms below). A module that
normalises its input (:func:`~stabq.health.grid_mechanisms.normalises`: ``pre_norm``,
``spherical``, ``cosine``) has codes that ignore the input's scale: lag is not judged
there, and the blow-ups measure codes against the chosen codes' median norm, not
``|x|_t``. Steps whose indices are all negative (quantization off) are skipped.

The grid mechanisms (``one_sided``, ``dims_correlated``) and SimVQ's ``map_singular``
are in :mod:`stabq.health.grid_mechanisms`; their figures are read in the same pass.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from stabq.health.grid_mechanisms import (
    MAP_EVERY,
    GridWatch,
    grid_levels,
    judge_map,
    linear_map,
    map_fields,
    normalises,
)
from stabq.health.probe import attr
from stabq.quantizers.base import QuantizerOutput

LAG_GROWTH = 100.0
LAG_RATIO = 10.0
BLOWUP = 1000.0
REDUCTION = 1000.0
FP16_MAX = 65504.0  # torch.finfo(torch.float16).max

Verdict = tuple[str, bool, str, float]  # (kind, holds, message, value) for CollapseMonitor._set


def sci(value: float) -> str:
    """``3.2e5 -> '3e5'``, ``4096 -> '4e3'``, ``0.5 -> '5e-1'``: one significant digit."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.0e}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _times(value: float) -> str:
    """A ratio in words: ``900.4 -> '900'``, ``2.04 -> '2'``, ``1.5 -> '1.5'``, ``3e5 -> '3e5'``."""
    if value >= 1e4:
        return sci(value)
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def quantized_of(output: Any) -> Tensor | None:
    """The quantized tensor of a forward's output (QuantizerOutput, dict, or tuple's first)."""
    if isinstance(output, tuple) and not isinstance(output, QuantizerOutput):
        output = next((o for o in output if isinstance(o, QuantizerOutput)), output)
    if isinstance(output, QuantizerOutput):
        return output.quantized
    if isinstance(output, Mapping):
        found = output.get("quantized")
    elif isinstance(output, tuple | list) and output:
        found = output[0]
    else:
        return None
    return found if isinstance(found, Tensor) and found.is_floating_point() else None


def code_table(module: nn.Module) -> Tensor | None:
    """The module's codes as rows ``(n, d)``, or None.

    Looked up: vector-quantize-pytorch's ``_codebook.embed``, stabq's
    ``codebook.embed``, else an ``embed`` / ``codebook`` / ``embedding`` tensor
    or ``nn.Embedding`` (tutorial modules).
    """
    for owner, name in (("_codebook", "embed"), ("codebook", "embed")):
        inner = attr(module, owner)
        if isinstance(inner, nn.Module) and isinstance(attr(inner, name), Tensor):
            table = attr(inner, name)
            return table.detach().reshape(-1, table.shape[-1])
    for name in ("embed", "codebook", "embedding", "embeddings"):
        found = attr(module, name)
        if isinstance(found, nn.Embedding):
            found = found.weight
        if isinstance(found, Tensor) and found.dim() >= 2 and found.is_floating_point():
            return found.detach().reshape(-1, found.shape[-1])
    return None


def _fp16_autocast(device: torch.device) -> bool:
    kind = device.type
    try:
        return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16
    except (RuntimeError, TypeError):  # a device type without autocast
        return False


class Mechanisms:
    """The readings of the last ``window`` steps, the five mechanism checks above and
    those of :mod:`stabq.health.grid_mechanisms`.

    ``bounded``: the codes are a grid (no lag or blow-up checks); ``single``: one
    codebook (the reduction check applies, unless ``bounded``); ``normalised``: the
    module normalises its input (no lag check); ``levels``: a grid's levels per code
    dimension, of ``books`` codebooks (the one-sign and correlation checks, judged once
    the window holds ``min_samples`` rows).
    """

    def __init__(
        self,
        window: int,
        *,
        bounded: bool,
        single: bool,
        normalised: bool = False,
        levels: Sequence[int] | None = None,
        books: int = 1,
        min_samples: int = 256,
    ) -> None:
        self.window, self.bounded, self.single = window, bounded, single
        self.normalised, self.books = normalised, books
        self.grid = None if levels is None else GridWatch(levels, window, min_samples)
        self.task_loss: float | None = None
        self.task_loss_at: float | None = None  # the task loss as it was at the step judged
        self.reset()

    @classmethod
    def of(cls, module: nn.Module, monitor: Any) -> Mechanisms:
        """The checks for quantizer ``module`` under ``monitor`` (a :class:`CollapseMonitor`:
        its window, codebook shape, ``grid`` and ``min_samples``)."""
        return cls(
            monitor.window, bounded=monitor.grid, single=monitor.num_codebooks == 1,
            normalised=normalises(module), books=monitor.num_codebooks,
            min_samples=monitor.min_samples,
            levels=grid_levels(module, monitor.codebook_size, monitor.levels, monitor.grid),
        )  # fmt: skip

    def reset(self) -> None:
        self.norms: deque[tuple[float, float]] = deque(maxlen=self.window)  # (|x|, |q|) a step
        self.steps = 0  # steps recorded (the map's singular values every MAP_EVERY of them)
        self.map_verdict: Verdict | None = None  # the latest map_singular reading
        if self.grid is not None:
            self.grid.reset()

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers (JSON): the window's norms and grid counts, the last task loss."""
        grid = None if self.grid is None else self.grid.state_dict()
        norms = [list(n) for n in self.norms]
        return {"norms": norms, "task_loss": self.task_loss, "steps": self.steps, "grid": grid,
                "map": self.map_verdict}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms = deque((tuple(n) for n in state["norms"]), maxlen=self.window)
        self.task_loss = state["task_loss"]
        self.steps = state.get("steps", 0)  # absent in checkpoints of before it
        found = state.get("map")
        self.map_verdict = None if found is None else tuple(found)
        if self.grid is not None and state.get("grid") is not None:
            self.grid.load_state_dict(state["grid"])

    def capture(self, module: nn.Module, x: Tensor | None, output: Any) -> Capture:
        """What one step's figures need and that may change after it, kept on the device (no
        sync): the input and the quantized rows, the largest code norm, the fp16 flag, the
        task loss quoted, SimVQ's map."""
        q = quantized_of(output)
        usable = x is not None and q is not None and q.shape == x.shape and x.numel() > 0
        half, book = False, None
        if usable:
            table = None if self.bounded else code_table(module)
            half = any(t is not None and t.dtype == torch.float16 for t in (x, q, table))
            half = half or _fp16_autocast(x.device)
            # a grid's figures judge only fp16 overflow: none to read in full precision
            usable = half or not self.bounded
            if usable and table is not None and table.numel():
                book = table.float().norm(dim=-1).max()  # the codes move: read them now
        weight = linear_map(module)
        return Capture(
            x.detach() if usable else None, q.detach() if usable else None, book, half,
            self.task_loss, None if weight is None else weight.clone(),
        )  # fmt: skip

    @torch.no_grad()
    def judge_steps(
        self, steps: Sequence[Kept], quantized: Sequence[bool],
        grid: Sequence[list[float]] | None = None,
    ) -> list[tuple[int, Verdict]]:  # fmt: skip
        """The verdicts of ``steps`` ``(step, capture, aux loss, input norm)``, oldest
        first, each with its step, for :meth:`CollapseMonitor._set`; ``quantized``: whether
        each step had an index >= 0 (steps of quantization off are skipped); ``grid``: each
        step's :meth:`GridWatch.fields` values. Their figures are computed together."""
        kept = [s[1:] for s, on in zip(steps, quantized, strict=True) if on and s[1].x is not None]
        reduction = self.single and not self.bounded  # the only check of the mean distance
        fields = iter(_batch_fields(kept, mse=reduction, median=self.normalised))
        found: list[tuple[int, Verdict]] = []
        grid = grid or [None] * len(steps)
        for (step, capture, *_), on, values in zip(steps, quantized, grid, strict=True):
            if not on:
                continue
            self.steps += 1
            self.task_loss_at = capture.task_loss
            verdicts: list[Verdict] = []
            if capture.x is not None:
                verdicts += self._judge(next(fields), capture.half)
            if self.grid is not None and values is not None:
                verdicts += self.grid.judge(values)
            if capture.weight is not None and (self.steps - 1) % MAP_EVERY == 0:
                self.map_verdict = judge_map(map_fields(capture.weight).tolist(),
                                             capture.weight.shape[0])  # fmt: skip
            found += [(step, v) for v in verdicts]
        return found

    def _judge(self, values: list[float], half: bool) -> list[Verdict]:
        x_norm, q_norm, x_max, q_max, book_max, mse, a, x_ok, q_ok, q_median = values
        verdicts: list[Verdict] = []
        if half:
            verdicts.append(self._fp16(max(x_max, q_max, _nan0(book_max)), x_ok, q_ok))
        if not (math.isfinite(x_norm) and math.isfinite(q_norm)) or x_norm <= 0:
            return verdicts
        if not (self.bounded or self.normalised):  # normalised codes ignore the input's scale
            self.norms.append((x_norm, q_norm))
            verdicts.append(self._lag(x_norm, q_norm))
        # the codes of a module that normalises its input are measured against the chosen
        # codes (in the normalised space), not against the input's scale
        ref, what = (q_median, "chosen codes' median") if self.normalised else (x_norm, "input")
        if not self.bounded and ref > 0:
            if math.isfinite(book_max):
                ratio = book_max / ref
                verdicts.append((
                    "codes_blown_up", ratio >= BLOWUP,
                    f"codes of norm {sci(book_max)} wait in the codebook, {sci(ratio)} x the "
                    f"{what} norm: never-used codes have blown up",
                    book_max,
                ))  # fmt: skip
            verdicts.append((
                "blown_code_chosen", q_max >= BLOWUP * ref,
                f"a code of norm {sci(q_max)} was chosen: never-used codes have blown up",
                q_max,
            ))  # fmt: skip
        if self.single and not self.bounded and math.isfinite(a) and a > 0 and mse > 0:
            verdicts.append(self._reduction(a, a / mse))
        return verdicts

    def _lag(self, x_norm: float, q_norm: float) -> Verdict:
        low = min(range(len(self.norms)), key=lambda i: self.norms[i][0])
        grew = x_norm / self.norms[low][0]
        moved = q_norm / max(self.norms[low][1], 1e-30)
        moved = max(moved, 1 / moved) if moved > 0 else math.inf
        steps = len(self.norms) - 1 - low
        span = f"{steps} step" + "s" * (steps != 1)
        return (
            "lag",
            grew >= LAG_GROWTH and grew >= LAG_RATIO * moved,
            f"encoder output norm grew {_times(grew)}x in {span} while the codes "
            f"moved {_times(moved)}x: the codebook lags the encoder",
            grew,
        )

    def _reduction(self, aux: float, ratio: float) -> Verdict:
        task, quoted = "", self.task_loss_at
        if quoted is not None and quoted > 0:
            task = f" and {sci(aux / quoted)} x the classification loss"
        return (
            "loss_reduction",
            ratio >= REDUCTION,
            f"the commitment loss is {sci(ratio)} x the mean squared distance to the codes"
            f"{task}: check its reduction (a sum over the batch where a mean is meant)",
            ratio,
        )

    @staticmethod
    def _fp16(largest_norm: float, x_ok: float, q_ok: float) -> Verdict:
        square = largest_norm**2 if math.isfinite(largest_norm) else math.inf
        if square < FP16_MAX and x_ok and not q_ok:
            message = "fp16 overflow in the distances: finite inputs gave non-finite codes or loss"
            return ("fp16_overflow", True, message, math.inf)
        return (
            "fp16_overflow",
            square >= FP16_MAX,
            f"fp16 overflow in the distances: squared norms reach {sci(square)}, above "
            f"float16's largest value {FP16_MAX:g}",
            square,
        )


class Capture(NamedTuple):
    """One step as :meth:`Mechanisms.capture` keeps it until its figures are computed."""

    x: Tensor | None  # the input rows (None: no lag, blow-up or fp16 figures this step)
    q: Tensor | None  # the quantized rows, x's shape
    book: Tensor | None  # 0-dim: the largest code norm at the step
    half: bool  # float16 tensors or fp16 autocast at the step
    task_loss: float | None  # the task loss :meth:`CollapseMonitor.observe` gave by then
    weight: Tensor | None  # a copy of SimVQ's map W at the step


Kept = tuple[int, Capture, float | None, float | None]  # step, capture, aux loss, input norm


def _batch_fields(
    steps: Sequence[tuple[Capture, float | None, float | None]], mse: bool, median: bool
) -> list[list[float]]:
    """The ten figures :meth:`Mechanisms._judge` reads of each step, in one pass over the
    steps whose rows have one shape and dtype (one device sync for them all). Figures no
    check reads are NaN: the mean squared distance without ``mse``, the codes' median
    norm without ``median``, the inputs' largest norm and the finiteness (1) off fp16.
    Each step is ``(capture, aux loss, the input's mean row norm if known)``."""
    keys = [(c.x.shape, c.x.dtype, c.q.dtype, c.x.device, c.half) for c, *_ in steps]
    rows: list[list[float]] = [[] for _ in steps]
    for key in dict.fromkeys(keys):
        at = [i for i, k in enumerate(keys) if k == key]
        d, half = key[0][-1] if len(key[0]) else 1, key[-1]
        qf = torch.stack([steps[i][0].q for i in at]).float().reshape(len(at), -1, d)
        qr = qf.norm(dim=-1)
        nan, one = qr.new_full((len(at),), math.nan), qr.new_ones(len(at))
        norms = [steps[i][2] for i in at]
        xf = xr = None
        if mse or half or None in norms:  # the inputs read again only where a check needs it
            xf = torch.stack([steps[i][0].x for i in at]).float().reshape(len(at), -1, d)
            xr = xf.norm(dim=-1)
        book = torch.stack([nan[0] if steps[i][0].book is None else steps[i][0].book.to(nan)
                            for i in at])  # fmt: skip
        x_norm = xr.mean(1) if None in norms else torch.tensor(norms).to(nan)
        fields = [x_norm, qr.mean(1), xr.amax(1) if half else nan, qr.amax(1), book,
                  (xf - qf).pow(2).mean((1, 2)) if mse else nan,
                  xf.isfinite().all(2).all(1).float() if half else one,
                  qf.isfinite().all(2).all(1).float() if half else one,
                  qr.median(1).values if median else nan]  # fmt: skip
        for i, values in zip(at, torch.stack(fields, 1).tolist(), strict=True):
            aux = steps[i][1]
            a = math.nan if aux is None else aux
            q_ok = float(bool(values[7]) and (aux is None or math.isfinite(aux)))
            rows[i] = [*values[:6], a, values[6], q_ok, values[8]]
    return rows


def _nan0(value: float) -> float:
    return 0.0 if math.isnan(value) else value


__all__ = ["BLOWUP", "FP16_MAX", "LAG_GROWTH", "REDUCTION", "Mechanisms", "code_table", "sci"]
