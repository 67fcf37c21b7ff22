"""Swap the quantizers of a user's model for stabq presets, in one line.

``swap_quantizers(model, "fsq")`` finds vector-quantize-pytorch's
``VectorQuantize``, ``ResidualVQ`` and ``FSQ``, stabq's own quantizers, and any
class named in ``classes``, and replaces each in place by
``build_quantizer(preset, dim)`` for the same input size. The replacement
returns what the module it replaces returned, in the same layout, so the
user's forward and training code run unchanged:

| original               | the replacement returns                                  |
|------------------------|----------------------------------------------------------|
| vqp ``FSQ``            | ``(out, indices)``, indices int32                        |
| vqp ``VectorQuantize`` | ``(quantized, indices, loss)``, int64, loss 0-dim        |
| vqp ``ResidualVQ``     | ``(quantized, indices, losses)``, ``(..., C)``, ``(1,)`` |
| stabq ``Quantizer``    | the new preset itself: a ``QuantizerOutput``             |
| a class in ``classes`` | what it returned, in its order (see below)                |

For a class in ``classes``, ``returns=`` names its outputs in order (from
quantized, indices, loss, perplexity; one name for a bare tensor). Without it,
a deep copy of the original runs once, in eval mode and without gradients, on a
``(2, dim)`` input, and each output is told by its type: ``quantized`` a float
of the input's shape, ``loss`` a float of one element, ``indices`` integers.
The replacement returns the same container (tuple, list, named tuple or bare
tensor) in the same order, the loss of the original's shape (``()`` or
``(1,)``) and the indices of its integer dtype. A copy that fails, or outputs
that are not one each of some of these, are a one-line ConfigError asking for
``returns=``. ``perplexity`` (only by ``returns=``: it looks like a loss) is
``exp`` of the entropy of the batch's codes.

``quantized`` has the input's shape. Indices have the original's layout (the
input's shape without its feature axis) and carry the preset's codebooks: a
trailing axis of ``num_codebooks`` for multi-codebook presets (``rvq``, ``pq``),
and always for a ResidualVQ, whose callers index layers. A ResidualVQ's
per-layer losses become one entry, their total. Each adapter holds the stabq
quantizer as ``.quantizer``, so ``CodebookUsage``, ``CollapseMonitor`` and
``indices_to_codes`` work on it. vector-quantize-pytorch is never imported
here: a model can only hold its modules once the user has imported it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stabq.errors import check, is_int
from stabq.model.swap_layout import Layout, class_name, layout_from_returns, probe_layout
from stabq.quantizers.base import Quantizer, QuantizerOutput
from stabq.quantizers.registry import PRESETS, build_quantizer


class SwappedQuantizer(nn.Module):
    """A stabq quantizer (``.quantizer``) behind the input layout of the module it replaced.

    ``x`` is ``(b, ..., dim)``, or ``(b, dim, ...)`` when ``channels_first``
    (or, with ``images_first``, when ``x`` has 4 or more dims); a 2-D ``(b, dim)``
    is always features-last. Returns a :class:`QuantizerOutput`: ``quantized`` in
    ``x``'s layout, ``indices`` ``x``'s shape without the feature axis (plus the
    preset's codebook axis) in ``index_dtype``, ``loss`` 0-dim.
    """

    def __init__(
        self,
        quantizer: Quantizer,
        *,
        channels_first: bool = False,
        images_first: bool = False,
        index_dtype: torch.dtype = torch.long,
    ) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.channels_first, self.images_first = channels_first, images_first
        self.index_dtype = index_dtype

    def quantize(self, x: Tensor) -> QuantizerOutput:
        move = x.dim() > 2 and (self.channels_first or (self.images_first and x.dim() >= 4))
        q, indices, loss = self.quantizer(x.movedim(1, -1) if move else x)
        return QuantizerOutput(q.movedim(-1, 1) if move else q, indices.to(self.index_dtype), loss)

    def forward(self, x: Tensor) -> QuantizerOutput:
        return self.quantize(x)


class SwappedFSQ(SwappedQuantizer):
    """In place of vector-quantize-pytorch's ``FSQ``: returns ``(out, indices)``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        out = self.quantize(x)
        return out.quantized, out.indices


class SwappedVectorQuantize(SwappedQuantizer):
    """In place of vector-quantize-pytorch's ``VectorQuantize``: ``(quantized, indices, loss)``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        return tuple(self.quantize(x))  # type: ignore[return-value]


class SwappedResidualVQ(SwappedQuantizer):
    """In place of vector-quantize-pytorch's ``ResidualVQ``: ``(quantized, indices, losses)``.

    ``indices`` ``(..., num_codebooks)`` (a trailing axis even of 1); ``losses``
    ``(1,)``: the quantizer's total auxiliary loss, as one entry.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        q, indices, loss = self.quantize(x)
        if not self.quantizer.multi_codebook:
            indices = indices.unsqueeze(-1)
        return q, indices, loss.reshape(1)


class SwappedCustom(SwappedQuantizer):
    """In place of a class named in ``classes=``: returns what it returned, in ``layout``."""

    def __init__(self, quantizer: Quantizer, layout: Layout, *, channels_first: bool) -> None:
        super().__init__(quantizer, channels_first=channels_first, index_dtype=layout.index_dtype)
        self.layout = layout

    def forward(self, x: Tensor) -> Any:  # type: ignore[override]
        return self.layout.build(self.quantize(x), self.quantizer)


@dataclass(frozen=True)
class Swap:
    """One replacement: where, what it was, what it is now."""

    path: str  # dotted path in the model, as ``model.get_submodule`` takes it
    old_class: str  # e.g. "vector_quantize_pytorch.FSQ"
    preset: str
    dim: int
    quantizer: Quantizer  # the new stabq quantizer (inside its adapter, if any)
    returns: Layout | None = None  # what it returns, for a class of ``classes=``

    def __str__(self) -> str:
        returns = "" if self.returns is None else f", returns {self.returns}"
        return f"{self.path}: {self.old_class} -> {self.preset} (dim {self.dim}{returns})"


@dataclass(frozen=True)
class SwapReport:
    """What :func:`swap_quantizers` replaced: iterable, ``len``, indexable, printable."""

    swaps: tuple[Swap, ...]

    def __iter__(self) -> Iterator[Swap]:
        return iter(self.swaps)

    def __len__(self) -> int:
        return len(self.swaps)

    def __getitem__(self, i: int) -> Swap:
        return self.swaps[i]

    def __str__(self) -> str:
        head = f"swapped {len(self)} quantizer{'s' * (len(self) != 1)}"
        return "\n".join([head + (":" if self.swaps else ""), *(f"  {s}" for s in self)])


def _vqp_kinds() -> dict[type, type[SwappedQuantizer]]:
    """vector-quantize-pytorch's classes, if the user has imported it."""
    vqp = sys.modules.get("vector_quantize_pytorch")
    if vqp is None:
        return {}
    return {vqp.FSQ: SwappedFSQ, vqp.VectorQuantize: SwappedVectorQuantize,
            vqp.ResidualVQ: SwappedResidualVQ}  # fmt: skip


def _matches(module: nn.Module, classes: tuple[type | str, ...]) -> bool:
    cls = type(module)
    names = {cls.__name__, cls.__qualname__, class_name(cls)}
    names.add(f"{cls.__module__}.{cls.__qualname__}")
    return any(
        (isinstance(c, str) and c in names) or (isinstance(c, type) and isinstance(module, c))
        for c in classes
    )


def _input_size(module: nn.Module) -> object:
    """``module.dim``; else, as vqp's ResidualVQ keeps it, ``project_in``'s input size or
    (no projection) ``codebook_dim``."""
    dim, project_in = getattr(module, "dim", None), getattr(module, "project_in", None)
    if dim is None and isinstance(project_in, nn.Linear):
        return project_in.in_features
    if dim is None and isinstance(project_in, nn.Identity):
        return getattr(module, "codebook_dim", None)
    return dim


def _replacement(
    path: str, old: nn.Module, preset: str, overrides: dict, returns: Layout | None
) -> tuple[nn.Module, int, Layout | None]:
    """The module to install at ``path`` in place of ``old``, its input size, and the layout
    it returns when ``old`` is a class of ``classes=`` (``returns``, else probed)."""
    dim = _input_size(old)
    check(
        is_int(dim) and dim >= 1,
        f"swap_quantizers: {path} ({class_name(type(old))}) has no integer attribute dim "
        f"(its input size; found {dim!r}); set {path}.dim before swapping",
    )
    quantizer = build_quantizer(preset, dim, **overrides)
    kinds = [kind for cls, kind in _vqp_kinds().items() if isinstance(old, cls)]
    custom = not isinstance(old, Quantizer) and not kinds
    layout = (returns or probe_layout(path, old, dim)) if custom else None
    device = next((t.device for t in [*old.parameters(), *old.buffers()]), None)
    quantizer = quantizer.to(device).train(old.training)
    if isinstance(old, Quantizer):  # stabq's own: the same interface, nothing to adapt
        return quantizer, dim, None
    flags = ("channel_first", "accept_image_fmap", "accept_3d_fmap")  # vqp's layout options
    first = any(getattr(old, f, False) for f in flags) or not getattr(old, "channel_last", True)
    if layout is not None:
        swapped: SwappedQuantizer = SwappedCustom(quantizer, layout, channels_first=first)
    else:
        swapped = kinds[0](
            quantizer,
            channels_first=first,
            images_first=kinds[0] is SwappedFSQ,  # vqp's FSQ reads any 4-D+ input channels-first
            index_dtype=torch.int32 if kinds[0] is SwappedFSQ else torch.long,
        )
    return swapped.train(old.training), dim, layout


def swap_quantizers(
    model: nn.Module,
    preset: str = "fsq",
    *,
    classes: Iterable[type | str] = (),
    returns: str | Sequence[str] | None = None,
    missing_ok: bool = False,
    **overrides: Any,
) -> SwapReport:
    """Replace every quantizer in ``model``, in place, by the stabq ``preset``.

    Args:
        model: the user's model; its quantizers are found anywhere inside it
            (not inside one another: a ResidualVQ's layers go with it).
        preset: a name of :func:`stabq.preset_names` (``fsq`` by default).
        classes: more quantizer classes to replace, as classes or class names;
            each must have an integer ``dim`` (its input size), and its
            replacement returns what it returned, in its order (module docstring).
        returns: what the classes of ``classes`` return, in order: a name or a
            tuple of names from ``quantized``, ``indices``, ``loss``,
            ``perplexity`` (e.g. ``("quantized", "loss", "indices")``); by default
            found by running a copy of each once.
        missing_ok: return an empty report, not an error, when nothing matches.
        **overrides: options of the preset (``levels=...``), as for
            :func:`stabq.build_quantizer`.

    Returns:
        A :class:`SwapReport`, one :class:`Swap` a replaced path. A module
        reachable by several paths is replaced by one new module at all of them.

    Raises:
        ConfigError: one line: an unknown preset or option, nothing to swap, an
            original without ``dim``, or one of ``classes`` whose outputs cannot be
            told apart (pass ``returns=``). Nothing is replaced then.

    Examples:
        >>> swap_quantizers(model, "fsq", classes=[MyVQ])  # doctest: +SKIP
        >>> q, loss, indices = model.vq(z)  # MyVQ's order, stabq's FSQ inside
    """
    if preset not in PRESETS:
        build_quantizer(preset, 1)  # raises its one-line error naming the presets
    check("dim" not in overrides, "swap_quantizers: dim comes from each original; drop dim=")
    classes = tuple(classes)
    check(
        returns is None or bool(classes),
        "swap_quantizers: returns= describes the classes named in classes=; name them there",
    )
    layout = None if returns is None else layout_from_returns(returns)
    for c in classes:
        check(
            isinstance(c, str) or (isinstance(c, type) and issubclass(c, nn.Module)),
            f"swap_quantizers: classes entry {c!r}, allowed is an nn.Module subclass or its name",
        )
    wanted = (Quantizer, *_vqp_kinds(), *classes)
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules(remove_duplicate=False):
        inside = any(path.startswith(p + ".") for p, _ in found)
        if not inside and _matches(module, wanted):
            found.append((path, module))
    if not found:
        check(
            missing_ok,
            f"swap_quantizers: no quantizer in {type(model).__name__} (looked for "
            "vector_quantize_pytorch's VectorQuantize, ResidualVQ and FSQ, stabq quantizers"
            f"{''.join(', ' + getattr(c, '__name__', c) for c in classes)}); name its class "
            "in classes=, or pass missing_ok=True",
        )
        return SwapReport(())
    check(
        found[0][0] != "",
        f"swap_quantizers: the model itself is a {type(model).__name__}; pass the module "
        "that holds it",
    )
    new: dict[int, tuple[nn.Module, int, Layout | None]] = {}
    for path, old in found:  # build every replacement before changing anything
        if id(old) not in new:
            new[id(old)] = _replacement(path, old, preset, overrides, layout)
    swaps = []
    for path, old in found:
        module, dim, returned = new[id(old)]
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, module)
        q = module if isinstance(module, Quantizer) else module.quantizer
        swaps.append(Swap(path, class_name(type(old)), preset, dim, q, returned))
    return SwapReport(tuple(swaps))


__all__ = [
    "Swap",
    "SwapReport",
    "SwappedCustom",
    "SwappedFSQ",
    "SwappedQuantizer",
    "SwappedResidualVQ",
    "SwappedVectorQuantize",
    "swap_quantizers",
]
