"""A model config checked against its weights' header before anything is built for real.

``config.json`` says how big every part of a model is; a crafted one (checksums
recomputed, so they match) could ask for ``codebook_size=10**12`` and have
:func:`stabq.load` try to allocate it. :func:`check_fits_weights` refuses that
before any real tensor exists:

1. every integer of the model config is within sane bounds (:func:`check_bounds`):
   none beyond 2**53, at most :data:`MAX_LAYERS` quantizer layers (each is built
   one by one), at most :data:`MAX_ROW_VALUES` values in one input row;
2. the model is built on the ``meta`` device (shapes, no storage; building runs no
   k-means and reads no data: codebooks are seeded when training starts);
3. its ``state_dict()`` names and shapes must equal those the safetensors header
   declares (the header only: no tensor is read). A mismatch is one
   :class:`~stabq.errors.ModelFileError` naming ``config.json``, the key and both
   values (``hidden=16, but model.safetensors was saved with hidden=8 ...``).

A user's factory is built on ``meta`` too (it is called twice: there, then for
real); one that cannot be is replaced there by a stand-in, and its own weights
are checked when they are loaded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from stabq.errors import ModelFileError, StabqError, is_int
from stabq.model.classifier import BottleneckClassifier
from stabq.model.encoders import is_reference

MAX_INT = 2**53  # beyond this a JSON number is not an exact integer anywhere
MAX_LAYERS = 1024  # num_quantizers: each layer is a module of its own
MAX_ROW_VALUES = 2**31  # values in one input row (the encoder is probed with two rows)
Shapes = dict[str, tuple[int, ...]]
KeyPath = tuple[str | int, ...]


def header_shapes(weights: Path) -> Shapes:
    """Name -> shape of every tensor ``weights`` declares, read from its header only."""
    with safe_open(str(weights), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


def _integers(value: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, int]]:
    """Every integer (not bool) in ``value``, with where it sits."""
    if is_int(value):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _integers(item, (*path, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _integers(item, (*path, i))


def _name(path: KeyPath) -> str:
    """``("quantizer_kwargs", "levels", 0)`` -> ``quantizer_kwargs.levels[0]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text


def check_bounds(config_path: Path, model: dict[str, Any]) -> None:
    """Refuse integers no model could have, before anything is built (see the module)."""
    for path, value in _integers(model):
        limit = MAX_LAYERS if path[-1:] == ("num_quantizers",) else MAX_INT
        if abs(value) > limit:
            raise ModelFileError(
                f"{config_path}: {_name(path)}={value}, allowed is at most {limit}"
            )
    shape = model.get("input_shape", model.get("input_dim"))
    shape = [shape] if is_int(shape) else shape
    positive = isinstance(shape, list) and all(is_int(v) and v > 0 for v in shape)
    if positive and math.prod(shape) > MAX_ROW_VALUES:
        raise ModelFileError(
            f"{config_path}: input_shape={shape}, allowed is at most {MAX_ROW_VALUES} "
            f"values in one row"
        )


class _StandIn(nn.Module):
    """Holds the place of a user's encoder that cannot be built on the meta device."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.out_dim)


def _meta_shapes(config_path: Path, model: dict[str, Any], stand_in: bool) -> Shapes:
    """Names and shapes of the model ``model`` describes, built on the meta device."""
    if stand_in:
        model = {**model, "encoder": _StandIn(model.get("bottleneck_dim", 128))}
    try:
        with torch.device("meta"):
            built = BottleneckClassifier.from_config(model)
    except StabqError:
        raise
    except (RuntimeError, TypeError, ValueError, OverflowError, MemoryError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelFileError(f"{config_path.parent}: cannot rebuild the model ({first})") from None
    shapes = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    return {k: v for k, v in shapes.items() if not (stand_in and k.startswith("projector."))}


def _set(model: dict[str, Any], path: KeyPath, value: int) -> dict[str, Any]:
    changed = copy.deepcopy(model)
    holder: Any = changed
    for part in path[:-1]:
        holder = holder[part]
    holder[path[-1]] = value
    return changed


def _culprit(config_path: Path, model: dict, name: str, want: tuple, have: tuple, stand_in: bool):
    """The config key whose value, set to what the weights hold, builds ``have``; or None."""
    if len(want) != len(have):
        return None
    axis = next(i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b)
    for path, value in _integers(model):
        if value != want[axis]:
            continue
        try:
            rebuilt = _meta_shapes(config_path, _set(model, path, have[axis]), stand_in)
        except StabqError:
            continue
        if rebuilt.get(name) == have:
            return _name(path), value, have[axis]
    return None


def _refuse(
    config_path: Path, weights: Path, model: dict, want: Shapes, have: Shapes, stand_in: bool
) -> None:
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        parts = [
            f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected))
            if names
        ]
        raise ModelFileError(
            f"{config_path}: the model it describes does not fit {weights.name} "
            f"({'; '.join(parts)})"
        )
    name = next(k for k in want if want[k] != have[k])
    encoder = model.get("encoder")
    if name.startswith("projector.") and is_reference(encoder):
        raise ModelFileError(
            f"{config_path.parent}: the encoder that {encoder} builds no longer fits the saved "
            f"weights ({name}: {list(have[name])} saved, {list(want[name])} built)"
        )
    found = _culprit(config_path, model, name, want[name], have[name], stand_in)
    if found is not None:
        key, value, saved = found
        raise ModelFileError(
            f"{config_path}: {key}={value}, but {weights.name} was saved with {key}={saved} "
            f"(its {name} has shape {list(have[name])}, not {list(want[name])})"
        )
    raise ModelFileError(
        f"{config_path}: the model it describes has {name} of shape {list(want[name])}, but "
        f"{weights.name} holds {list(have[name])}"
    )


def check_fits_weights(config_path: Path, weights: Path, model: dict[str, Any]) -> None:
    """Refuse a model config whose sizes are not those of the tensors in ``weights``.

    Args:
        config_path: the ``config.json`` the model section came from (named in errors).
        weights: the ``model.safetensors`` beside it (its header is read, no tensor).
        model: the ``model`` section of ``config.json``.

    Raises:
        ModelFileError: an integer out of bounds, a model that cannot be built, or a
            name or shape unlike the header's (naming the key and both values where one
            key explains it).
        StabqError: what building the model raises for an invalid option.

    Example::

        check_fits_weights(d / "config.json", d / "model.safetensors", config["model"])
    """
    check_bounds(config_path, model)
    have = header_shapes(weights)
    stand_in = False
    try:
        want = _meta_shapes(config_path, model, stand_in)
    except StabqError:
        if not is_reference(model.get("encoder")):
            raise
        stand_in = True  # a factory that will not build on meta: its weights are checked later
        want = _meta_shapes(config_path, model, stand_in)
    if stand_in:
        have = {k: v for k, v in have.items() if not k.startswith("projector.")}
    if want != have:
        _refuse(config_path, weights, model, want, have, stand_in)


__all__ = ["MAX_INT", "MAX_LAYERS", "MAX_ROW_VALUES", "check_bounds", "check_fits_weights"]
