"""What a quantizer module says about itself, for :class:`stabq.CollapseMonitor`.

Reads code indices and the auxiliary loss from any forward's output (stabq's
``QuantizerOutput``, vector-quantize-pytorch's tuples, a user's dict), and the
codebook size, number of codebooks and FSQ levels from a module's attributes.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stabq.errors import ShapeError, check, check_int, is_int
from stabq.quantizers.base import QuantizerOutput


def read_output(output: Any) -> tuple[Tensor, Tensor | None]:
    """``(indices, loss)`` from what a quantizer's forward returned.

    Understood: a :class:`QuantizerOutput` (also inside a tuple, as
    ``BottleneckClassifier`` returns it); a dict with ``"indices"`` and
    optionally ``"loss"``; a tuple ``(quantized, indices[, loss, ...])`` with
    integer indices (vector-quantize-pytorch's VectorQuantize, ResidualVQ, FSQ);
    a tuple in another order with one integer tensor, the indices, and at most
    one float of one element, the loss (``(quantized, loss, indices)``).
    """
    if isinstance(output, tuple) and not isinstance(output, QuantizerOutput):
        output = next((o for o in output if isinstance(o, QuantizerOutput)), output)
    indices = loss = None
    if isinstance(output, QuantizerOutput):
        indices, loss = output.indices, output.loss
    elif isinstance(output, Mapping):
        indices, loss = output.get("indices"), output.get("loss")
    elif isinstance(output, tuple | list) and len(output) >= 2:
        ints = [o for o in output if isinstance(o, Tensor) and not o.is_floating_point()]
        if any(o is output[1] for o in ints) or len(ints) != 1:
            indices, loss = output[1], output[2] if len(output) > 2 else None
        else:  # another order, as (quantized, loss, indices): the one integer tensor
            floats = [o for o in output if isinstance(o, Tensor) and o.is_floating_point()]
            scalars = [o for o in floats if o.numel() == 1]
            indices, loss = ints[0], scalars[0] if len(scalars) == 1 else None
    if not (isinstance(indices, Tensor) and not indices.is_floating_point()):
        raise ShapeError(
            f"CollapseMonitor: found no integer code indices in the module's output "
            f"({type(output).__name__}); expected a QuantizerOutput, a dict with 'indices' "
            "or a tuple (quantized, indices, ...)"
        )
    if isinstance(loss, float | int) and not isinstance(loss, bool):
        loss = torch.tensor(float(loss))
    if not (isinstance(loss, Tensor) and loss.is_floating_point()):
        loss = None
    return indices, loss


def attr(module: nn.Module, name: str) -> Any:
    try:
        return getattr(module, name, None)
    except Exception:  # e.g. vector-quantize-pytorch's ResidualVQ with unequal codebooks
        return None


def target(module: nn.Module) -> nn.Module:
    """The quantizer whose attributes describe the codes: ``module`` or its ``.quantizer``."""
    inner = attr(module, "quantizer")
    if attr(module, "codebook_size") is None and isinstance(inner, nn.Module):
        return inner
    return module


def infer_num_codebooks(q: nn.Module) -> int:
    multi = attr(q, "multi_codebook")  # stabq: RVQ and PQ keep a trailing codebook axis
    if isinstance(multi, bool):
        return q.num_codebooks if multi else 1
    if is_int(attr(q, "num_quantizers")):  # vector-quantize-pytorch residual quantizers
        return q.num_quantizers
    if attr(q, "separate_codebook_per_head") and is_int(attr(q, "heads")):
        return q.heads  # vector-quantize-pytorch VectorQuantize with a codebook per head
    if attr(q, "keep_num_codebooks_dim") and is_int(attr(q, "num_codebooks")):
        return q.num_codebooks  # vector-quantize-pytorch FSQ / LFQ
    return 1


def infer_levels(q: nn.Module, codebook_size: int) -> list[int] | None:
    for name in ("levels", "_levels"):
        found = attr(q, name)
        if isinstance(found, Tensor) and found.dim() == 1 and not found.is_floating_point():
            found = found.tolist()
        if isinstance(found, Sequence) and found and all(is_int(v) and v >= 2 for v in found):
            return list(found) if math.prod(found) == codebook_size else None
    return None


def codebook_shape(
    q: nn.Module,
    owner: str,
    codebook_size: int | None = None,
    num_codebooks: int | None = None,
    levels: Sequence[int] | None = None,
) -> tuple[int, int, list[int] | None]:
    """``(codebook_size, num_codebooks, levels)`` of quantizer ``q``: the given values,
    checked, or what ``q`` says of itself (``levels`` None where it has none). Raises a
    one-line :class:`~stabq.errors.ConfigError` naming ``owner`` and the bad value."""
    found = attr(q, "codebook_size")
    check(
        codebook_size is not None or (is_int(found) and found >= 1),
        f"{owner}: codebook_size is required: {type(q).__name__} has no integer "
        f"attribute codebook_size >= 1 (found {found!r})",
    )
    size = check_int(owner, "codebook_size", found if codebook_size is None else codebook_size, 1)
    books = infer_num_codebooks(q) if num_codebooks is None else num_codebooks
    books = check_int(owner, "num_codebooks", books, 1)
    chosen = infer_levels(q, size) if levels is None else levels
    check(
        chosen is None
        or (
            isinstance(chosen, Sequence)
            and all(is_int(v) and v >= 2 for v in chosen)
            and math.prod(chosen) == size
        ),
        f"{owner}: levels={levels!r}, allowed is a list of integers >= 2 whose product "
        f"is codebook_size={size}",
    )
    return size, books, None if chosen is None else list(chosen)


GRID_CLASSES = ("FSQ", "ResidualFSQ", "LFQ")  # vector-quantize-pytorch's fixed-grid quantizers


def is_grid_module(q: nn.Module, levels: Sequence[int] | None) -> bool:
    """Whether ``q``'s codes are cells of a fixed grid, which learn nothing and cannot die:
    stabq's ``grid`` quantizers, a quantizer with known ``levels``, vector-quantize-pytorch's
    FSQ, ResidualFSQ and LFQ."""
    peer = type(q).__module__.startswith("vector_quantize_pytorch")
    return (
        bool(getattr(q, "grid", False))
        or levels is not None
        or (peer and type(q).__name__ in GRID_CLASSES)
    )


def first_input(args: tuple, kwargs: dict) -> Tensor | None:
    """The forward's first tensor argument (the rows being quantized), or None."""
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)


def input_norm(args: tuple, kwargs: dict) -> Tensor | None:
    """Mean L2 norm over the last dim of the first tensor argument (None if not float)."""
    x = first_input(args, kwargs)
    if x is None or not x.is_floating_point() or x.dim() == 0 or x.numel() == 0:
        return None
    return x.detach().float().norm(dim=-1).mean()


def fraction(owner: str, name: str, value: object) -> float:
    check(
        isinstance(value, float | int) and not isinstance(value, bool) and 0 < value <= 1,
        f"{owner}: {name}={value!r}, allowed is a number in (0, 1]",
    )
    return float(value)  # type: ignore[arg-type]


_OWN_FILES = {
    os.path.join(os.path.dirname(__file__), f"{name}.py")
    for name in ("monitor", "monitor_probe", "mechanisms", "window")
}


def caller_level() -> int:
    """``stacklevel`` that points a warning at the code that called the module."""
    frame, level = sys._getframe(2), 2  # 1: CollapseMonitor._set
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    while frame is not None and (
        frame.f_code.co_filename in _OWN_FILES or frame.f_code.co_filename.startswith(torch_dir)
    ):
        frame, level = frame.f_back, level + 1
    return level


def gather(scalars: list[float | None]) -> Tensor | None:
    """The recorded numbers as one float64 CPU tensor, None if none."""
    found = [t for t in scalars if t is not None]
    return torch.tensor(found, dtype=torch.float64) if found else None


def codes_carrying(counts: Tensor, fraction: float) -> int:
    """Fewest codes whose counts sum to at least ``fraction`` of ``counts.sum()`` (0 if empty)."""
    total = int(counts.sum())
    if total == 0:
        return 0
    need = math.ceil(fraction * total - 1e-9)
    used = counts[counts > 0]  # unused codes add nothing: sort only the used ones
    return int((used.sort(descending=True).values.cumsum(0) < need).sum()) + 1


def percent(fraction: float) -> str:
    """``0.95 -> '95%'``, ``0.9996 -> '99.9%'``: rounded down, never overstated."""
    return f"{math.floor(fraction * 1000 + 1e-6) / 10:g}%"
