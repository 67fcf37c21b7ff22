"""BottleneckClassifier: standardise -> projector MLP -> quantizer -> head MLP.

    x (n, input_dim) -> (x - mean) / std -> projector -> z (n, bottleneck_dim)
    q, indices, aux = quantizer(z)
    h = mix * q + (1 - mix) * z        (mix = 1 except while quantization is ramped in)
    logits = head(h) (n, num_classes)

The head is an MLP with one hidden layer, not a linear layer: FSQ reduces the
bottleneck to 6 code dimensions, and a linear head on those could only cut
the code cube with one hyperplane per class; one hidden layer lets the head
read any cell of the code grid, and costs little for the other quantizers.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

from stabq.errors import ConfigError, ShapeError, check, is_int
from stabq.quantizers.base import Quantizer, QuantizerOutput
from stabq.quantizers.registry import build_quantizer


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    """Linear layers through ``sizes`` with GELU and dropout between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class BottleneckClassifier(nn.Module):
    """A classifier with a discrete bottleneck in front of its head.

    Args:
        input_dim: number of input features.
        num_classes: number of classes (>= 2).
        quantizer: a preset name (see ``stabq.preset_names()``).
        hidden: width of the projector's and the head's hidden layers.
        dropout: dropout after each hidden layer.
        bottleneck_dim: size of the features handed to the quantizer.
        **quantizer_kwargs: options passed to the preset (``levels=...``, ...).

    ``forward(x)`` returns ``(logits, QuantizerOutput)``.
    """

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        quantizer: str = "fsq",
        hidden: int = 256,
        dropout: float = 0.1,
        bottleneck_dim: int = 128,
        **quantizer_kwargs: Any,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("input_dim", input_dim, 1),
            ("num_classes", num_classes, 2),
            ("hidden", hidden, 1),
            ("bottleneck_dim", bottleneck_dim, 1),
        ):
            check(
                is_int(value) and value >= low, f"{name}={value!r}, allowed is an integer >= {low}"
            )
        check(
            isinstance(dropout, float | int) and 0 <= dropout < 1,
            f"dropout={dropout!r}, allowed is a number in [0, 1)",
        )
        self.arch = {
            "input_dim": input_dim,
            "num_classes": num_classes,
            "quantizer": quantizer,
            "hidden": hidden,
            "dropout": float(dropout),
            "bottleneck_dim": bottleneck_dim,
            "quantizer_kwargs": dict(quantizer_kwargs),
        }
        self.register_buffer("feature_mean", torch.zeros(input_dim))
        self.register_buffer("feature_std", torch.ones(input_dim))
        self.projector = mlp([input_dim, hidden, hidden, bottleneck_dim], dropout)
        self.quantizer: Quantizer = build_quantizer(quantizer, bottleneck_dim, **quantizer_kwargs)
        self.head = mlp([bottleneck_dim, hidden, num_classes], dropout)
        self.quantize_mix = 1.0
        self.classes: list[str] | None = None  # class names, set by training or loading

    @property
    def input_dim(self) -> int:
        return self.arch["input_dim"]

    @property
    def num_classes(self) -> int:
        return self.arch["num_classes"]

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable: ``from_config(config())`` rebuilds it."""
        return {**self.arch, "quantizer_kwargs": dict(self.arch["quantizer_kwargs"])}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BottleneckClassifier:
        """Build an untrained model from :meth:`config`'s output."""
        try:
            kwargs = {k: config[k] for k in ("input_dim", "num_classes", "quantizer")}
        except KeyError as err:
            raise ConfigError(f"model config lacks the key {err.args[0]!r}") from None
        for key in ("hidden", "dropout", "bottleneck_dim"):
            if key in config:
                kwargs[key] = config[key]
        extra = config.get("quantizer_kwargs", {})
        check(isinstance(extra, dict), f"quantizer_kwargs={extra!r}, allowed is a mapping")
        return cls(**kwargs, **extra)

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise inputs as ``(x - mean) / std`` from now on (both ``(input_dim,)``)."""
        mean, std = torch.as_tensor(mean).float(), torch.as_tensor(std).float()
        check(
            mean.shape == std.shape == (self.input_dim,),
            f"feature statistics of shapes {tuple(mean.shape)} and {tuple(std.shape)}, "
            f"expected ({self.input_dim},)",
            ShapeError,
        )
        check(bool((std > 0).all()), "feature std must be > 0 everywhere", ShapeError)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def take_continuous_weights(self, other: BottleneckClassifier) -> None:
        """Copy ``other``'s feature statistics, projector and head (for ``--init-from``).

        ``other`` is typically a model trained with ``quantizer="none"``: its
        projector and head fit this model's wherever the sizes agree.
        """
        for part in ("projector", "head"):
            mine, theirs = getattr(self, part).state_dict(), getattr(other, part).state_dict()
            shapes = {k: tuple(v.shape) for k, v in mine.items()}
            found = {k: tuple(v.shape) for k, v in theirs.items()}
            check(
                shapes == found,
                f"the {part} of the model to start from has shapes {found}, this model's "
                f"are {shapes}: build it with the same input_dim, hidden, bottleneck_dim "
                f"and classes",
                ShapeError,
            )
            getattr(self, part).load_state_dict(theirs)
        self.set_feature_stats(other.feature_mean, other.feature_std)

    def features(self, x: Tensor) -> Tensor:
        """Continuous bottleneck features ``(n, bottleneck_dim)``: what the quantizer sees."""
        check(
            x.dim() >= 1 and x.shape[-1] == self.input_dim,
            f"input of shape {tuple(x.shape)}: the model expects {self.input_dim} features",
            ShapeError,
        )
        x = x.to(self.feature_mean.dtype)
        return self.projector((x - self.feature_mean) / self.feature_std)

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        logits, out, _ = self.forward_with_features(x)
        return logits, out

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, QuantizerOutput, Tensor]:
        """``(logits, QuantizerOutput, z)`` with ``z`` the continuous bottleneck features."""
        z = self.features(x)
        out = self.quantizer(z)
        h = out.quantized
        if self.quantize_mix < 1.0 and self.quantizer.quantization_enabled:
            h = self.quantize_mix * h + (1.0 - self.quantize_mix) * z
        return self.head(h), out, z

    def logits_from_indices(self, indices: Tensor) -> Tensor:
        """The head's logits for stored codes: ``head(quantizer.indices_to_codes(indices))``."""
        return self.head(self.quantizer.indices_to_codes(indices))
