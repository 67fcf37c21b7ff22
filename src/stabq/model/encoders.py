"""Encoders: what turns inputs ``(N, *input_shape)`` into bottleneck features ``(N, d)``.

    mlp     (N, D)                 Linear D -> h -> h -> d, GELU and dropout between
    cnn1d   (N, L) or (N, C, L)    conv k5, then 3 x (conv k3 stride 2), GELU; Linear -> d
    cnn2d   (N, H, W), (N, C, H, W)  conv 3x3, then 2 x (conv 3x3 stride 2), GELU; Linear -> d
    "package.module:factory"       ``factory(input_shape, d)`` returns the user's nn.Module;
                                   saved by that reference and imported again on load
    an nn.Module                   the user's own instance: trains and compares, and
                                   saving it needs a factory instead (nothing is pickled)

``h`` is the model's ``hidden`` width; the CNNs use ``hidden // 8`` channels (32 by
default; the second 2-D stage doubles them). Inputs are standardised before the encoder:
per feature for ``mlp``, per channel for the CNNs and for a user's encoder of inputs
with channels (:func:`stats_shape`).
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import nn

from stabq.errors import ConfigError, ShapeError, check

BUILTIN_ENCODERS: tuple[str, ...] = ("mlp", "cnn1d", "cnn2d", "transformer", "bag")
TOKEN_ENCODERS: tuple[str, ...] = ("transformer", "bag")  # those that take token ids
_RANKS = {"mlp": (1,), "cnn1d": (1, 2), "cnn2d": (2, 3), "transformer": (1,), "bag": (1,)}
_TAKES = {"mlp": "(N, D)", "cnn1d": "(N, L) or (N, C, L)", "cnn2d": "(N, H, W) or (N, C, H, W)",
          "transformer": "token ids (N, L)", "bag": "token ids (N, L)"}  # fmt: skip
# the transformer's own options: given with the quantizer's (``--option d_model=32``), they
# go to the encoder
ENCODER_OPTIONS: dict[str, tuple[str, ...]] = {
    "transformer": ("d_model", "heads", "layers", "ff"),
    "bag": ("d_model",),
}
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
Shape = tuple[int, ...]


def mlp(sizes: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear layers through ``sizes`` with GELU and dropout between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def _halved(n: int, times: int) -> int:
    """Length after ``times`` convolutions of kernel 3, stride 2, padding 1."""
    for _ in range(times):
        n = (n - 1) // 2 + 1
    return n


class CNN1d(nn.Module):
    """Sequences ``(N, L)`` (one channel) or ``(N, C, L)`` -> ``(N, out_dim)``."""

    def __init__(self, input_shape: Shape, out_dim: int, channels: int, dropout: float) -> None:
        super().__init__()
        in_channels, length = (1, *input_shape) if len(input_shape) == 1 else input_shape
        self.one_channel = len(input_shape) == 1
        layers: list[nn.Module] = [nn.Conv1d(in_channels, channels, 5, padding=2), nn.GELU()]
        for _ in range(3):
            layers += [nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.GELU()]
        self.conv = nn.Sequential(*layers)
        self.out = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * _halved(length, 3), out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x.unsqueeze(1) if self.one_channel else x))


class CNN2d(nn.Module):
    """Images ``(N, H, W)`` (one channel) or ``(N, C, H, W)`` -> ``(N, out_dim)``."""

    def __init__(self, input_shape: Shape, out_dim: int, channels: int, dropout: float) -> None:
        super().__init__()
        in_channels, height, width = (1, *input_shape) if len(input_shape) == 2 else input_shape
        self.one_channel = len(input_shape) == 2
        wide = 2 * channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, wide, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(wide, wide, 3, stride=2, padding=1), nn.GELU(),
        )  # fmt: skip
        area = _halved(height, 2) * _halved(width, 2)
        self.out = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(wide * area, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x.unsqueeze(1) if self.one_channel else x))


def is_reference(spec: object) -> bool:
    """True for a ``package.module:factory`` string."""
    return isinstance(spec, str) and bool(_REFERENCE.match(spec))


def encoder_name(spec: str | nn.Module) -> str:
    """What ``config.json`` records: the built-in's name or the factory reference; a module
    instance is named ``instance:ClassName`` (not rebuildable, so not saveable)."""
    return f"instance:{type(spec).__name__}" if isinstance(spec, nn.Module) else spec


def check_encoder(spec: object) -> None:
    """A built-in name, a ``package.module:factory`` reference or an ``nn.Module``."""
    if isinstance(spec, nn.Module) or spec in BUILTIN_ENCODERS or is_reference(spec):
        return
    raise ConfigError(
        f"encoder={spec!r}: allowed is {', '.join(BUILTIN_ENCODERS)}, a reference "
        f"'package.module:factory' to a callable (input_shape, out_dim) -> nn.Module, "
        f"or an nn.Module"
    )


def check_input_shape(spec: object, input_shape: Shape, source: str | None = None) -> None:
    """Inputs of one row's shape ``input_shape`` fit a built-in encoder, else a ShapeError
    naming the expected and the found shape (and ``source``, the data, when given)."""
    if spec not in _RANKS or len(input_shape) in _RANKS[spec]:
        return
    found = "(N, " + ", ".join(map(str, input_shape)) + ")"
    hint = {1: "mlp or cnn1d", 2: "cnn1d or cnn2d", 3: "cnn2d"}.get(len(input_shape), "")
    where = f"{source}: " if source else ""
    advice = f": choose --encoder {hint}" if hint else ""
    raise ShapeError(
        f"{where}inputs of shape {found}: encoder {spec!r} takes {_TAKES[spec]}{advice}"
    )


def stats_shape(spec: object, input_shape: Shape) -> Shape:
    """Shape of the standardisation statistics: per feature for ``mlp`` (and rows of one
    axis), per channel otherwise (``(C, 1, ...)``; a one-channel CNN input has ``(1,)``)."""
    rank = len(input_shape)
    if (spec, rank) in (("cnn1d", 1), ("cnn2d", 2)):  # no channel axis: one channel
        return (1,) * rank
    if spec == "mlp" or rank == 1:
        return tuple(input_shape)
    return (input_shape[0], *([1] * (rank - 1)))


def _import(module_name: str) -> ModuleType:
    """Import ``module_name`` as ``python -m stabq`` would: the working directory is searched
    too, also from the ``stabq`` command, whose own path does not hold it."""
    here = os.getcwd()
    searched = here in sys.path or "" in sys.path
    if not searched:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    finally:
        if not searched:
            sys.path.remove(here)


def _factory(reference: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = reference.partition(":")
    try:
        module = _import(module_name)
    except Exception as err:  # an import error, or whatever the module raises on import
        raise ConfigError(
            f"encoder {reference!r}: cannot import {module_name!r} ({type(err).__name__}: {err})"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(
            f"encoder {reference!r}: {module_name} has no callable {attribute!r} (expected a "
            f"factory (input_shape, out_dim) -> nn.Module)"
        )
    return factory


def _check_output(
    encoder: nn.Module, input_shape: Shape, out_dim: int, name: str, pad_id: int | None = None
) -> None:
    """One eval-mode pass over two zero rows (rows of ``pad_id`` for token ids): the encoder
    must give ``(2, out_dim)``."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            probe = next((p for p in encoder.parameters()), None)
            kw = {"dtype": probe.dtype, "device": probe.device} if probe is not None else {}
            if pad_id is not None:  # token ids: two rows of padding
                kw = {"dtype": torch.long, "device": kw.get("device")}
            out = encoder(torch.full((2, *input_shape), pad_id or 0, **kw))
    except Exception as err:
        raise ShapeError(
            f"encoder {name!r} fails on inputs of shape (N, {', '.join(map(str, input_shape))})"
            f" ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        ) from None
    finally:
        encoder.train(was_training)
    found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if found != (2, out_dim):
        shown = found if isinstance(found, str) else "(N, " + ", ".join(map(str, found[1:])) + ")"
        raise ShapeError(
            f"encoder {name!r} maps inputs of shape (N, {', '.join(map(str, input_shape))}) "
            f"to {shown}; the bottleneck takes (N, {out_dim})"
        )


def _builtin(
    spec: str, input_shape: Shape, out_dim: int, hidden: int, dropout: float, ids: dict
) -> nn.Module:
    """A built-in encoder: the transformer takes token ids (``ids``: ``vocab_size``,
    ``pad_id`` and its options), the others take features."""
    options = dict(ids.get("options") or {})
    if spec in TOKEN_ENCODERS:
        check(ids.get("vocab_size") is not None, f"encoder {spec!r} takes token ids: give "
              "vocab_size (integer inputs, ids in [0, vocab_size))")  # fmt: skip
        return _token_encoder(spec, input_shape, out_dim, hidden, dropout, ids, options)
    check(ids.get("vocab_size") is None, f"encoder {spec!r} takes features, not token ids: "
          "choose --encoder transformer or your own factory for integer inputs")  # fmt: skip
    check(not options, f"encoder {spec!r} takes no options, found {sorted(options)}")
    if spec == "mlp":
        return mlp([input_shape[0], hidden, hidden, out_dim], dropout)
    channels = max(8, hidden // 8)
    if spec == "cnn1d":
        return CNN1d(input_shape, out_dim, channels, dropout)
    return CNN2d(input_shape, out_dim, channels, dropout)


def _token_encoder(
    spec: str, input_shape: Shape, out_dim: int, hidden: int, dropout: float, ids: dict,
    options: dict,
) -> nn.Module:  # fmt: skip
    """The transformer or the bag of tokens, for token ids below ``ids["vocab_size"]``."""
    vocab, pad = ids["vocab_size"], ids["pad_id"]
    try:
        if spec == "bag":
            from stabq.model.bag import TokenBag

            return TokenBag(vocab, out_dim, hidden=hidden, dropout=dropout, pad_id=pad, **options)
        from stabq.model.transformer import TokenTransformer

        return TokenTransformer(vocab, input_shape[0], out_dim, pad_id=pad, dropout=dropout,
                                **options)  # fmt: skip
    except TypeError as err:  # an option it does not have
        raise ConfigError(f"encoder {spec!r}: {err}") from None


def build_encoder(
    spec: str | nn.Module,
    input_shape: Shape,
    out_dim: int,
    hidden: int,
    dropout: float,
    *,
    vocab_size: int | None = None,
    pad_id: int = 0,
    options: dict | None = None,
) -> nn.Module:
    """The encoder ``spec`` names, for rows of ``input_shape``, giving ``out_dim`` features;
    with ``vocab_size``, for rows of token ids (padded with ``pad_id``)."""
    check_encoder(spec)
    check_input_shape(spec, input_shape)
    ids = {"vocab_size": vocab_size, "pad_id": pad_id, "options": options}
    if spec in BUILTIN_ENCODERS:
        return _builtin(spec, input_shape, out_dim, hidden, dropout, ids)
    check(not options, f"encoder {encoder_name(spec)!r} takes no encoder options")
    if isinstance(spec, nn.Module):
        encoder, name = spec, encoder_name(spec)
    else:
        try:
            encoder = _factory(spec)(tuple(input_shape), out_dim)
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(
                f"encoder {spec!r} raised {type(err).__name__} when called with input_shape="
                f"{tuple(input_shape)}, out_dim={out_dim}: {' '.join(str(err).split())[:200]}"
            ) from None
        if not isinstance(encoder, nn.Module):
            raise ConfigError(
                f"encoder {spec!r} returned {type(encoder).__name__}, expected an nn.Module"
            )
        name = spec
    _check_output(encoder, input_shape, out_dim, name, None if vocab_size is None else pad_id)
    return encoder


__all__ = [
    "BUILTIN_ENCODERS", "CNN1d", "CNN2d", "build_encoder", "check_encoder", "check_input_shape",
    "encoder_name", "is_reference", "mlp", "stats_shape",
]  # fmt: skip
