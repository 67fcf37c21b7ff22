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
| a class in ``classes`` | a ``QuantizerOutput``                                    |

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stabq.errors import check, is_int
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


@dataclass(frozen=True)
class Swap:
    """One replacement: where, what it was, what it is now."""

    path: str  # dotted path in the model, as ``model.get_submodule`` takes it
    old_class: str  # e.g. "vector_quantize_pytorch.FSQ"
    preset: str
    dim: int
    quantizer: Quantizer  # the new stabq quantizer (inside its adapter, if any)

    def __str__(self) -> str:
        return f"{self.path}: {self.old_class} -> {self.preset} (dim {self.dim})"


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


def _class_name(cls: type) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


def _matches(module: nn.Module, classes: tuple[type | str, ...]) -> bool:
    cls = type(module)
    names = {cls.__name__, cls.__qualname__, _class_name(cls)}
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


def _replacement(path: str, old: nn.Module, preset: str, overrides: dict) -> tuple[nn.Module, int]:
    """The module to install at ``path`` in place of ``old``, and its input size."""
    dim = _input_size(old)
    check(
        is_int(dim) and dim >= 1,
        f"swap_quantizers: {path} ({_class_name(type(old))}) has no integer attribute dim "
        f"(its input size; found {dim!r}); set {path}.dim before swapping",
    )
    quantizer = build_quantizer(preset, dim, **overrides)
    device = next((t.device for t in [*old.parameters(), *old.buffers()]), None)
    quantizer = quantizer.to(device).train(old.training)
    if isinstance(old, Quantizer):  # stabq's own: the same interface, nothing to adapt
        return quantizer, dim
    kinds = [kind for cls, kind in _vqp_kinds().items() if isinstance(old, cls)]
    adapter = kinds[0] if kinds else SwappedQuantizer
    flags = ("channel_first", "accept_image_fmap", "accept_3d_fmap")  # vqp's layout options
    first = any(getattr(old, f, False) for f in flags) or not getattr(old, "channel_last", True)
    swapped = adapter(
        quantizer,
        channels_first=first,
        images_first=adapter is SwappedFSQ,  # vqp's FSQ reads any 4-D+ input channels-first
        index_dtype=torch.int32 if adapter is SwappedFSQ else torch.long,
    )
    return swapped.train(old.training), dim


def swap_quantizers(
    model: nn.Module,
    preset: str = "fsq",
    *,
    classes: Iterable[type | str] = (),
    missing_ok: bool = False,
    **overrides,
) -> SwapReport:
    """Replace every quantizer in ``model``, in place, by the stabq ``preset``.

    Args:
        model: the user's model; its quantizers are found anywhere inside it
            (not inside one another: a ResidualVQ's layers go with it).
        preset: a name of :func:`stabq.preset_names` (``fsq`` by default).
        classes: more quantizer classes to replace, as classes or class names;
            each must have an integer ``dim`` (its input size), and its
            replacement returns a :class:`QuantizerOutput`.
        missing_ok: return an empty report, not an error, when nothing matches.
        **overrides: options of the preset (``levels=...``), as for
            :func:`stabq.build_quantizer`.

    Returns:
        A :class:`SwapReport`, one :class:`Swap` a replaced path. A module
        reachable by several paths is replaced by one new module at all of them.
    """
    if preset not in PRESETS:
        build_quantizer(preset, 1)  # raises its one-line error naming the presets
    check("dim" not in overrides, "swap_quantizers: dim comes from each original; drop dim=")
    classes = tuple(classes)
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
    new: dict[int, tuple[nn.Module, int]] = {}
    for path, old in found:  # build every replacement before changing anything
        if id(old) not in new:
            new[id(old)] = _replacement(path, old, preset, overrides)
    swaps = []
    for path, old in found:
        module, dim = new[id(old)]
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, module)
        q = module if isinstance(module, Quantizer) else module.quantizer
        swaps.append(Swap(path, _class_name(type(old)), preset, dim, q))
    return SwapReport(tuple(swaps))


__all__ = [
    "Swap",
    "SwapReport",
    "SwappedFSQ",
    "SwappedQuantizer",
    "SwappedResidualVQ",
    "SwappedVectorQuantize",
    "swap_quantizers",
]
