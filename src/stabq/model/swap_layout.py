"""What a user's own quantizer returns, so that its stabq replacement returns the same.

A :class:`Layout` names a forward's outputs in order, from :data:`NAMES`:
``quantized`` (the input's shape), ``indices`` (integers), ``loss`` (one float
element) and ``perplexity`` (one float element: ``exp`` of the entropy of the
batch's codes, averaged over codebooks). :func:`layout_from_returns` reads the
``returns=`` a user gives :func:`stabq.swap_quantizers`; :func:`probe_layout`
finds it by running a deep copy of the module once, in eval mode, without
gradients, on a ``(2, dim)`` input, and refuses what it cannot map for sure.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stabq.errors import ConfigError, check
from stabq.quantizers.base import Quantizer, QuantizerOutput

NAMES = ("quantized", "indices", "loss", "perplexity")
HINT = (
    "; pass returns=(...) naming its outputs in order from quantized, indices, loss, "
    "perplexity, e.g. returns=('quantized', 'loss', 'indices')"
)


@dataclass(frozen=True)
class Layout:
    """A forward's outputs: ``names`` in order, in ``container`` (a tuple, list or named
    tuple type; None for one bare tensor); ``loss`` and ``perplexity`` of ``loss_shape``
    (``()`` or ``(1,)``), indices of ``index_dtype``."""

    names: tuple[str, ...]
    container: type | None = tuple
    loss_shape: tuple[int, ...] = ()
    index_dtype: torch.dtype = torch.long

    def __str__(self) -> str:
        return self.names[0] if self.container is None else f"({', '.join(self.names)})"

    def build(self, out: QuantizerOutput, quantizer: Quantizer) -> Any:
        """``out`` (of ``quantizer``) in this layout."""
        values = {"quantized": out.quantized, "indices": out.indices.to(self.index_dtype)}
        values["loss"] = out.loss.reshape(self.loss_shape)
        if "perplexity" in self.names:
            values["perplexity"] = batch_perplexity(out.indices, quantizer).reshape(self.loss_shape)
        found = [values[name] for name in self.names]
        if self.container is None:
            return found[0]
        if hasattr(self.container, "_fields"):  # a named tuple: fields by position
            return self.container(*found)
        return self.container(found)


@torch.no_grad()
def batch_perplexity(indices: Tensor, quantizer: Quantizer) -> Tensor:
    """``exp H`` of the codes in ``indices`` (``quantizer``'s layout; -1 ignored), the mean
    over its codebooks (0 for one that chose none), as :class:`stabq.CodebookUsage` gives
    ``perplexity``: 0-dim float32."""
    c, k = quantizer.num_codebooks if quantizer.multi_codebook else 1, quantizer.codebook_size
    flat = indices.reshape(-1, c).long()
    ids = torch.where(flat < 0, c * k, flat + torch.arange(c, device=flat.device) * k)
    counts = torch.bincount(ids.reshape(-1), minlength=c * k + 1)[: c * k].view(c, k).float()
    total = counts.sum(-1, keepdim=True)
    p = counts / total.clamp_min(1.0)
    return ((-torch.special.xlogy(p, p).sum(-1)).exp() * (total[:, 0] > 0)).mean()


def layout_from_returns(returns: str | Sequence[str]) -> Layout:
    """The layout a user named: one name (a bare tensor) or a tuple or list of names (a tuple)."""
    names = (returns,) if isinstance(returns, str) else returns
    check(
        isinstance(names, tuple | list)
        and len(names) >= 1
        and all(isinstance(n, str) and n in NAMES for n in names)
        and len(set(names)) == len(names),
        f"swap_quantizers: returns={returns!r}, allowed is a name or a tuple of names from "
        f"{', '.join(NAMES)}, each at most once",
    )
    return Layout(tuple(names), None if isinstance(returns, str) else tuple)


def class_name(cls: type) -> str:
    """``package.Class``: the top-level package and the qualified name."""
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    return type(value).__name__


def _name(value: Any, shape: torch.Size) -> str | None:
    """quantized: float of the input's shape; loss: float of one element; indices: integers."""
    if not isinstance(value, Tensor):
        return None
    if value.is_floating_point():
        if value.shape == shape:
            return "quantized"
        return "loss" if value.numel() == 1 and value.dim() <= 1 else None
    return None if value.dtype == torch.bool or value.is_complex() else "indices"


def _run_copy(module: nn.Module, dim: int) -> tuple[Any, Tensor]:
    """A deep copy of ``module``, in eval mode and without gradients, on a ``(2, dim)`` input
    of its device and float dtype; the random streams are put back after."""
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    x = torch.randn(2, dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        return copy.deepcopy(module).eval()(x), x


def probe_layout(path: str, module: nn.Module, dim: int) -> Layout:
    """The layout of what ``module`` (at ``path``, input size ``dim``) returns, found by
    running a copy (:func:`_run_copy`); ``module`` itself is not run. Raises ConfigError,
    one line naming ``path`` and the class, when the copy fails or the outputs are not one
    each of some of quantized, indices and loss in a tuple or list, or a bare tensor."""
    where = f"swap_quantizers: {path} ({class_name(type(module))})"
    try:
        out, x = _run_copy(module, dim)
    except Exception as err:  # the user's forward: anything may go wrong in it
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"{where}: running a copy of it on a (2, {dim}) input to see what it returns "
            f"raised {type(err).__name__}: {detail}{HINT}"
        ) from None
    single = isinstance(out, Tensor)
    entries = [out] if single else list(out) if isinstance(out, tuple | list) else None
    if entries is None:
        raise ConfigError(
            f"{where} returns a {type(out).__name__}, not a tensor, tuple or list (what a "
            f"replacement can return){HINT}"
        )
    names = [_name(e, x.shape) for e in entries]
    doubled = sorted({n for n in names if n is not None and names.count(n) > 1})
    if None in names or doubled or not entries:
        found = f"{type(out).__name__} ({', '.join(map(_describe, entries))})"
        why = f"more than one output looks like {' and '.join(doubled)}" if doubled else (
            f"output {names.index(None) + 1} is none of quantized (the input's shape), loss "
            "(one float element) or indices (integers)" if entries else "no output"
        )  # fmt: skip
        raise ConfigError(f"{where} returns a {found} for a {_describe(x)} input: {why}{HINT}")
    loss = next((e for e, n in zip(entries, names, strict=True) if n == "loss"), None)
    index = next((e for e, n in zip(entries, names, strict=True) if n == "indices"), None)
    return Layout(
        tuple(names),  # type: ignore[arg-type]
        None if single else type(out),
        tuple(loss.shape) if loss is not None else (),
        index.dtype if index is not None else torch.long,
    )


__all__ = [
    "NAMES",
    "Layout",
    "batch_perplexity",
    "class_name",
    "layout_from_returns",
    "probe_layout",
]
