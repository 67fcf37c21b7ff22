"""Swap the quantizers of a user's model for stabq presets, in one line
(:func:`swap_quantizers`; its docstring says what each replacement returns).

The adapters below give a stabq quantizer the input layout and the return values of the
module it replaces. vector-quantize-pytorch is never imported here: a model can only hold
its modules once the user has imported it.
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


class SwappedFSP(SwappedQuantizer):
    """In place of vector-quantize-pytorch's ``FSP``: ``(out, indices, loss, info)``, indices
    int32 and ``info`` an empty dict (the peer's diagnostics have no stabq counterpart)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:  # type: ignore[override]
        return (*self.quantize(x), {})  # type: ignore[return-value]


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
    """One replacement of `swap_quantizers`: where, what it was, what it is now.

    Attributes:
        path: the dotted path in the model, as `model.get_submodule` takes it.
        old_class: the class replaced, e.g. `"vector_quantize_pytorch.FSQ"`.
        preset: the preset that replaced it.
        dim: its input size.
        quantizer: the new stabq quantizer (inside its adapter, if any).
        returns: what it returns, for a class of `classes=`; else None.

    Examples:
        >>> import torch, stabq
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), stabq.VectorQuantizer(16, 64))
        >>> print(stabq.swap_quantizers(model, "rfsq")[0])
        1: stabq.VectorQuantizer -> rfsq (dim 16)
    """

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
    """What `swap_quantizers` replaced: iterable, `len`, indexable, printable.

    Attributes:
        swaps: one `Swap` a replaced path (`path`, `old_class`, `preset`, `dim`, the new
            `quantizer`, and `returns`, the layout of a class of `classes=`).

    Examples:
        >>> import torch, stabq
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), stabq.VectorQuantizer(16, 64))
        >>> report = stabq.swap_quantizers(model, "pq")
        >>> len(report), report[0].path, report[0].old_class, report[0].quantizer is model[1]
        (1, '1', 'stabq.VectorQuantizer', True)
    """

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
    kinds = {vqp.FSQ: SwappedFSQ, vqp.VectorQuantize: SwappedVectorQuantize,
             vqp.ResidualVQ: SwappedResidualVQ}  # fmt: skip
    if hasattr(vqp, "FSP"):  # from vector-quantize-pytorch 1.32
        kinds[vqp.FSP] = SwappedFSP
    return kinds


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
            index_dtype=torch.int32 if kinds[0] in (SwappedFSQ, SwappedFSP) else torch.long,
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
    """Replace every quantizer in a model, in place, by a stabq preset.

    Found anywhere in `model`: vector-quantize-pytorch's `VectorQuantize`, `ResidualVQ`,
    `FSQ` and `FSP`, stabq's own quantizers, and the classes named in `classes`. Each is
    replaced by `build_quantizer(preset, dim)` for its input size, behind an adapter
    that returns what the module it replaces returned, in the same layout, so the
    model's forward and training code run unchanged:

    - vector-quantize-pytorch `FSQ`: `(out, indices)`, indices int32;
    - `FSP`: `(out, indices, loss, info)`, indices int32, a 0-dim loss, `info` an empty
      dict;
    - `VectorQuantize`: `(quantized, indices, loss)`, int64 indices, a 0-dim loss;
    - `ResidualVQ`: `(quantized, indices, losses)`, indices `(..., C)` (a trailing
      axis of the preset's codebooks, even of 1), the layers' losses as one entry `(1,)`;
    - a stabq `Quantizer`: the new preset itself, returning a `QuantizerOutput`;
    - a class of `classes`: the same container (tuple, list, named tuple or bare
      tensor) in the same order, the loss in the original's shape (`()` or `(1,)`),
      indices in its integer dtype; `perplexity` is `exp` of the entropy of the batch's
      codes.

    `quantized` has the input's shape (channels-first where the original was); indices
    have the input's shape without its feature axis, plus the preset's codebook axis
    for `rvq` and `pq`. Each adapter holds the stabq quantizer as `.quantizer`, for
    `CodebookUsage`, `CollapseMonitor` and `indices_to_codes`.

    Args:
        model: the model; its quantizers are found anywhere inside it (not inside one
            another: a ResidualVQ's layers go with it).
        preset: a name of `stabq.preset_names()` (`"fsq"` by default).
        classes: more quantizer classes to replace, as classes or class names; each must
            have an integer `dim` (its input size).
        returns: what the classes of `classes` return, in order: a name or a tuple of
            names from `quantized`, `indices`, `loss`, `perplexity` (e.g.
            `("quantized", "loss", "indices")`); by default a copy of each runs once, in
            eval mode, on a `(2, dim)` input, and each output is told by its type.
        missing_ok: return an empty report, not an error, when nothing matches.
        **overrides (Any): options of the preset (`levels=...`), as for
            `build_quantizer`.

    Returns:
        A `SwapReport`, one `Swap` a replaced path. A module reachable by several paths
            is replaced by one new module at all of them.

    Raises:
        ConfigError: an unknown preset or option, nothing to swap, an original without
            `dim`, or one of `classes` whose outputs cannot be told apart (pass
            `returns=`). Nothing is replaced then.

    Examples:
        >>> import torch, stabq
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), stabq.VectorQuantizer(16, 64))
        >>> print(stabq.swap_quantizers(model, "fsq"))
        swapped 1 quantizer:
          1: stabq.VectorQuantizer -> fsq (dim 16)
        >>> class MyVQ(torch.nn.Module):  # returns (quantized, loss, indices)
        ...     def __init__(self, dim):
        ...         super().__init__()
        ...         self.dim = dim
        ...     def forward(self, z):
        ...         return z, z.new_zeros(()), z.new_zeros(z.shape[:-1], dtype=torch.long)
        >>> holder = torch.nn.Module()
        >>> holder.vq = MyVQ(16)
        >>> report = stabq.swap_quantizers(holder, "rvq", classes=[MyVQ])
        >>> quantized, loss, indices = holder.vq(torch.randn(4, 16))
        >>> quantized.shape, loss.shape, indices.shape
        (torch.Size([4, 16]), torch.Size([]), torch.Size([4, 4]))
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
            "vector_quantize_pytorch's VectorQuantize, ResidualVQ, FSQ and FSP, stabq quantizers"
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
    "SwappedFSP",
    "SwappedFSQ",
    "SwappedQuantizer",
    "SwappedResidualVQ",
    "SwappedVectorQuantize",
    "swap_quantizers",
]
