"""BottleneckClassifier: standardise -> encoder -> quantizer -> head MLP.

    x (n, *input_shape) -> (x - mean) / std -> encoder -> z (n, bottleneck_dim)
    q, indices, aux = quantizer(z)
    h = mix * q + (1 - mix) * z        (mix = 1 except while quantization is ramped in)
    logits = head(h) (n, num_classes)

The encoder is the projector MLP for feature rows, a small CNN for sequences or
images, or the user's own module (:mod:`stabq.encoders`); ``mean`` and ``std``
are per feature for the MLP, per channel for the CNNs. The head is an MLP with
one hidden layer, not a linear layer: FSQ reduces the bottleneck to 6 code
dimensions, and a linear head on those could only cut the code cube with one
hyperplane per class; one hidden layer lets the head read any cell of the code
grid, and costs little for the other quantizers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stabq.errors import ConfigError, ShapeError, check, is_int
from stabq.model.encoders import (
    ENCODER_OPTIONS,
    build_encoder,
    check_encoder,
    encoder_name,
    mlp,
    stats_shape,
)
from stabq.quantizers.base import Quantizer, QuantizerOutput
from stabq.quantizers.registry import build_quantizer


def _shape(input_shape: object) -> tuple[int, ...]:
    """One input row's shape from an int (features) or a sequence of ints."""
    shape = (input_shape,) if is_int(input_shape) else input_shape
    ok = isinstance(shape, Sequence) and not isinstance(shape, str) and len(shape) >= 1
    check(
        ok and all(is_int(v) and v >= 1 for v in shape),
        f"input_shape={input_shape!r}, allowed is an integer >= 1 (features) or a sequence "
        f"of them (one row's shape, e.g. (1, 8, 8))",
    )
    return tuple(int(v) for v in shape)


def _id_options(vocab_size: object, pad_id: object, options: object) -> dict[str, Any]:
    """The config entries of token-id inputs (none for features), checked."""
    found: dict[str, Any] = {}
    if vocab_size is not None:
        check(is_int(vocab_size) and vocab_size >= 2,
              f"vocab_size={vocab_size!r}, allowed is an integer >= 2 or None")  # fmt: skip
        check(is_int(pad_id) and 0 <= pad_id < vocab_size,
              f"pad_id={pad_id!r}, allowed is an id in [0, vocab_size={vocab_size})")  # fmt: skip
        found.update(vocab_size=int(vocab_size), pad_id=int(pad_id))
    if options:
        check(isinstance(options, dict) and all(isinstance(k, str) for k in options),
              f"encoder_options={options!r}, allowed is a dict of options")  # fmt: skip
        found["encoder_options"] = dict(options)
    return found


def _encoder_options(encoder: object, given: dict | None, quantizer_kwargs: dict) -> dict | None:
    """``given`` plus the encoder's own options found among the quantizer's (taken out of
    ``quantizer_kwargs``): ``--option d_model=32`` reaches the transformer."""
    own = ENCODER_OPTIONS.get(encoder, ()) if isinstance(encoder, str) else ()
    moved = {k: quantizer_kwargs.pop(k) for k in own if k in quantizer_kwargs}
    return {**(given or {}), **moved} or None


def check_id_tensor(x: Tensor, vocab_size: int) -> Tensor:
    """``x`` as int64 token ids if every one lies in ``[0, vocab_size)``, else a
    :class:`ShapeError` naming the first bad id's row and position (before any lookup)."""
    check(not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool,
          f"inputs of dtype {x.dtype}: the model takes token ids (integers in "
          f"[0, {vocab_size}))", ShapeError)  # fmt: skip
    bad = (x < 0) | (x >= vocab_size)
    if bool(bad.any()):
        row, flat = divmod(int(bad.reshape(-1).nonzero()[0]), bad[0].numel())
        at = (
            flat
            if x.dim() == 2
            else tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(x.shape[1:])))
        )
        value = int(x.reshape(len(x), -1)[row, flat])
        raise ShapeError(f"row {row}, position {at}: token id {value}, allowed is an id in "
                         f"[0, {vocab_size}), the vocabulary")  # fmt: skip
    return x.long()


class BottleneckClassifier(nn.Module):
    """A classifier with a discrete bottleneck: standardise, encoder, quantizer, head MLP.

    `x (n, *input_shape)` is standardised (`(x - mean) / std`, statistics set by
    `stabq.train`), encoded to `z (n, bottleneck_dim)`, quantized, and the head (an MLP
    with one hidden layer, so it can read any cell of a small code grid) gives the
    logits. `forward(x)` returns `(logits (n, num_classes), QuantizerOutput)`.

    Args:
        input_shape: one input row's shape: an int for feature rows, `(L,)` or
            `(C, L)` for sequences, `(C, H, W)` for images.
        num_classes: number of classes, an integer >= 2.
        quantizer: a preset name of `build_quantizer` (default `"fsq"`).
        hidden: width of the MLPs' hidden layers (the CNNs use `hidden // 8` channels).
        dropout: dropout after each hidden layer, in [0, 1).
        bottleneck_dim: size of the features handed to the quantizer.
        encoder: `"mlp"` (feature rows), `"cnn1d"`, `"cnn2d"`, `"transformer"` or `"bag"`
            (token ids `(L,)`), `"package.module:factory"` (a callable
            `(input_shape, out_dim) -> nn.Module`) or an `nn.Module` (such a model cannot
            be saved).
        input_dim: `input_shape` by its old name, for feature rows; give one of the two.
        vocab_size: for inputs of token ids (int64, never standardised): ids run over
            `[0, vocab_size)`; None (the default) for features.
        pad_id: the id that pads a sequence after its end (token ids only; default 0).
        encoder_options: options of the built-in encoder (the transformer's `d_model`,
            `heads`, `layers`, `ff`).
        **quantizer_kwargs (Any): options of the preset (`levels=...`, ...).

    Raises:
        ConfigError: neither or both of `input_shape` and `input_dim`, a size or option
            out of range, an unknown encoder or preset, or a preset option it lacks.

    Examples:
        >>> import torch, stabq
        >>> model = stabq.BottleneckClassifier(20, 3, "vq", hidden=64, bottleneck_dim=32)
        >>> logits, out = model(torch.randn(5, 20))
        >>> logits.shape, out.indices.shape
        (torch.Size([5, 3]), torch.Size([5]))
        >>> model.logits_from_indices(out.indices).shape  # from stored codes
        torch.Size([5, 3])
    """

    def __init__(
        self,
        input_shape: int | Sequence[int] | None = None,
        num_classes: int | None = None,
        quantizer: str = "fsq",
        hidden: int = 256,
        dropout: float = 0.1,
        bottleneck_dim: int = 128,
        *,
        encoder: str | nn.Module = "mlp",
        input_dim: int | None = None,
        vocab_size: int | None = None,
        pad_id: int = 0,
        encoder_options: dict[str, Any] | None = None,
        **quantizer_kwargs: Any,
    ) -> None:
        super().__init__()
        check(
            (input_shape is None) != (input_dim is None),
            f"give one of input_shape and input_dim, found input_shape={input_shape!r}, "
            f"input_dim={input_dim!r}",
        )
        shape = _shape(input_shape if input_dim is None else input_dim)
        sizes = (("num_classes", num_classes, 2), ("hidden", hidden, 1),
                 ("bottleneck_dim", bottleneck_dim, 1))  # fmt: skip
        for name, value, low in sizes:
            ok = is_int(value) and value >= low
            check(ok, f"{name}={value!r}, allowed is an integer >= {low}")
        check(
            isinstance(dropout, float | int) and 0 <= dropout < 1,
            f"dropout={dropout!r}, allowed is a number in [0, 1)",
        )
        check_encoder(encoder)
        encoder_options = _encoder_options(encoder, encoder_options, quantizer_kwargs)
        self.arch = {
            "input_shape": list(shape),
            "num_classes": num_classes,
            "quantizer": quantizer,
            "hidden": hidden,
            "dropout": float(dropout),
            "bottleneck_dim": bottleneck_dim,
            "encoder": encoder_name(encoder),
            "quantizer_kwargs": dict(quantizer_kwargs),
        }
        if len(shape) == 1:
            self.arch["input_dim"] = shape[0]  # the name configs had before input_shape
        self.arch.update(_id_options(vocab_size, pad_id, encoder_options))
        self.stats_shape = stats_shape(encoder, shape)
        self.register_buffer("feature_mean", torch.zeros(self.stats_shape))
        self.register_buffer("feature_std", torch.ones(self.stats_shape))
        # "projector": the name its weights have had in saved models since the first format
        self.projector = build_encoder(
            encoder, shape, bottleneck_dim, hidden, dropout, vocab_size=vocab_size,
            pad_id=pad_id, options=encoder_options,
        )  # fmt: skip
        self.quantizer: Quantizer = build_quantizer(quantizer, bottleneck_dim, **quantizer_kwargs)
        self.head = mlp([bottleneck_dim, hidden, num_classes], dropout)
        self.quantize_mix = 1.0
        self.classes: list[str] | None = None  # class names, set by training or loading

    @property
    def encoder(self) -> nn.Module:
        """The module that maps inputs to bottleneck features (``projector``, by its old name)."""
        return self.projector

    @property
    def vocab_size(self) -> int | None:
        """The number of token ids the model takes (`[0, vocab_size)`), None for features."""
        return self.arch.get("vocab_size")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input row's shape."""
        return tuple(self.arch["input_shape"])

    @property
    def saveable(self) -> bool:
        """False for an encoder given as a module instance: only a factory can be rebuilt."""
        return not self.arch["encoder"].startswith("instance:")

    @property
    def input_dim(self) -> int:
        """Values in one input row (the number of features for feature rows)."""
        return math.prod(self.input_shape)

    @property
    def num_classes(self) -> int:
        """Number of classes the head scores."""
        return self.arch["num_classes"]

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable: ``from_config(config())`` rebuilds it."""
        return {**self.arch, "quantizer_kwargs": dict(self.arch["quantizer_kwargs"])}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BottleneckClassifier:
        """Build an untrained model from `config()`'s output.

        A factory encoder is imported again; configs from before `input_shape` give
        `input_dim`.

        Args:
            config: the dict `config()` returned (or a saved model's `model` section).

        Raises:
            ConfigError: a key missing, an encoder given as a module instance, or an
                argument the constructor refuses.
        """
        shape = config.get("input_shape", config.get("input_dim"))
        try:
            kwargs = {"num_classes": config["num_classes"], "quantizer": config["quantizer"]}
        except KeyError as err:
            raise ConfigError(f"model config lacks the key {err.args[0]!r}") from None
        if shape is None:
            raise ConfigError("model config lacks the key 'input_shape'")
        for key in ("hidden", "dropout", "bottleneck_dim", "encoder", "vocab_size", "pad_id",
                    "encoder_options"):  # fmt: skip
            if key in config:
                kwargs[key] = config[key]
        check(
            not str(kwargs.get("encoder", "")).startswith("instance:"),
            f"encoder={kwargs.get('encoder')!r} was a module instance: it cannot be rebuilt",
        )
        extra = config.get("quantizer_kwargs", {})
        check(isinstance(extra, dict), f"quantizer_kwargs={extra!r}, allowed is a mapping")
        return cls(shape, **kwargs, **extra)

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise inputs as `(x - mean) / std` from now on.

        Args:
            mean: of `stats_shape`: `(input_dim,)` for feature rows, one value a channel
                for the CNNs.
            std: of the same shape, > 0 everywhere.

        Raises:
            ShapeError: shapes other than `stats_shape`, or a `std` that is not > 0.
        """
        mean, std = torch.as_tensor(mean).float(), torch.as_tensor(std).float()
        if mean.numel() == std.numel() == math.prod(self.stats_shape):
            mean, std = mean.reshape(self.stats_shape), std.reshape(self.stats_shape)
        check(
            mean.shape == std.shape == self.stats_shape,
            f"feature statistics of shapes {tuple(mean.shape)} and {tuple(std.shape)}, "
            f"expected {self.stats_shape}",
            ShapeError,
        )
        check(bool((std > 0).all()), "feature std must be > 0 everywhere", ShapeError)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def take_continuous_weights(self, other: BottleneckClassifier) -> None:
        """Copy another model's feature statistics, encoder and head (for `--init-from`).

        Args:
            other: typically a model trained with `quantizer="none"`, built with the same
                input shape, encoder, `hidden`, `bottleneck_dim` and classes.

        Raises:
            ShapeError: the encoder's or head's shapes differ.
        """
        for part in ("projector", "head"):
            mine, theirs = getattr(self, part).state_dict(), getattr(other, part).state_dict()
            shapes = {k: tuple(v.shape) for k, v in mine.items()}
            found = {k: tuple(v.shape) for k, v in theirs.items()}
            check(
                shapes == found,
                f"the {part} of the model to start from has shapes {found}, this model's "
                f"are {shapes}: build it with the same input shape, encoder, hidden, "
                f"bottleneck_dim and classes",
                ShapeError,
            )
            getattr(self, part).load_state_dict(theirs)
        self.set_feature_stats(other.feature_mean, other.feature_std)

    def features(self, x: Tensor) -> Tensor:
        """Continuous bottleneck features `(n, bottleneck_dim)`: what the quantizer sees.

        Args:
            x: inputs `(n, *input_shape)`; token ids may be shorter, `(n, l <= L)`: they are
                padded with `pad_id` to the model's length `L`.

        Raises:
            ShapeError: `x` does not have the model's input shape.
        """
        length = self.input_shape[0]
        if self.vocab_size is not None and x.dim() == 2 and 0 < x.shape[1] < length:
            x = torch.nn.functional.pad(x, (0, length - x.shape[1]), value=self.arch["pad_id"])
        if tuple(x.shape[1:]) != self.input_shape or x.dim() < 2:
            wanted = (
                f"{self.input_shape[0]} features"
                if len(self.input_shape) == 1
                else f"rows of shape {self.input_shape}"
            )
            raise ShapeError(f"input of shape {tuple(x.shape)}: the model expects {wanted}")
        if self.vocab_size is not None:  # token ids: checked, never standardised
            return self.projector(check_id_tensor(x, self.vocab_size))
        x = x.to(self.feature_mean.dtype)
        return self.projector((x - self.feature_mean) / self.feature_std)

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Classify `x`.

        Args:
            x: inputs `(n, *input_shape)`.

        Returns:
            `(logits (n, num_classes), QuantizerOutput)`.

        Raises:
            ShapeError: `x` does not have the model's input shape.
        """
        logits, out, _ = self.forward_with_features(x)
        return logits, out

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, QuantizerOutput, Tensor]:
        """`(logits, QuantizerOutput, z)`, `z` the continuous bottleneck features.

        Args:
            x: inputs `(n, *input_shape)`.
        """
        z = self.features(x)
        out = self.quantizer(z)
        h = out.quantized
        if self.quantize_mix < 1.0 and self.quantizer.quantization_enabled:
            h = self.quantize_mix * h + (1.0 - self.quantize_mix) * z
        return self.head(h), out, z

    def logits_from_indices(self, indices: Tensor) -> Tensor:
        """The head's logits `(n, num_classes)` for stored codes.

        Args:
            indices: codes as the quantizer gave them, `(n,)` or `(n, num_codebooks)`.
        """
        return self.head(self.quantizer.indices_to_codes(indices))
