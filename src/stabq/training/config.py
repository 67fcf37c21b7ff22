"""What a training run is told (TrainConfig) and what it reports (TrainResult)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from stabq.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
MONITORS = ("val_accuracy", "val_loss")


@dataclass
class TrainConfig:
    """Options of :func:`stabq.train`.

    Optimisation: AdamW (``lr``, ``weight_decay``), a cosine schedule with
    linear warm-up over ``warmup_epochs`` (restarted for stage 2 of two-stage
    training), ``grad_clip`` on the global gradient norm (``None``: no clipping).
    ``optimizer="sgd"`` takes plain SGD with ``momentum`` (and ``weight_decay``)
    instead, as much user code does: the ``explode`` preset of :mod:`stabq.compare`
    runs every method under it.

    Guards (``guards=True``): a batch with non-finite inputs, or standardised
    inputs above ``feature_spike_factor`` x the recent batches', is skipped; a
    step whose loss is non-finite or above ``spike_factor`` x the median of the
    last ``guard_window`` losses, whose bottleneck feature norm is above
    ``feature_spike_factor`` x its minimum over 10 steps, or whose gradient norm is not
    finite is undone: the last good weights, buffers and optimiser state come
    back and the learning rate is scaled by ``lr_backoff`` (it doubles back
    after every ``guard_window`` clean steps, never to a rate that failed
    twice); a lost epoch goes back to the best one (see
    :mod:`stabq.training.guard`). More than ``max_recoveries`` recoveries
    without a clean epoch between them stop the run with
    :class:`stabq.errors.TrainingError`.

    Two-stage: ``two_stage=True`` trains ``stage1_epochs`` (default a third of
    ``epochs``) with quantization off, seeds the codebooks by k-means on the
    learned features, then trains the remaining epochs quantized;
    ``stage1_epochs=0`` starts at the seeding (for a model already trained
    continuously). ``freeze_projector`` keeps the projector fixed in stage 2.
    ``ramp_epochs`` feeds the head ``mix * quantized + (1 - mix) * continuous``
    with ``mix`` rising linearly from 0 to 1 over that many epochs of the
    quantized stage.

    Length: ``epochs`` epochs on the cosine schedule, unless ``patience`` is set:
    then each stage trains until it stops improving (:mod:`stabq.training.stopping`):
    a constant rate after the warm-up, dropped 10x after ``patience`` epochs without
    a better validation accuracy (``monitor``; the loss breaks ties), ``lr_drops``
    times, and ``patience`` more such epochs end the stage; ``epochs`` is the ceiling.
    The model goes back to its best epoch.

    ``compile=True`` runs the quantizer through ``torch.compile`` (it stays
    compiled after training). ``benchmarks/train.py --compile`` measures whether
    that pays on the machine at hand.
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    grad_clip: float | None = 1.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    val_fraction: float = 0.1
    guards: bool = True
    spike_factor: float = 10.0
    feature_spike_factor: float = 100.0
    guard_window: int = 50
    max_recoveries: int = 10
    lr_backoff: float = 0.5
    two_stage: bool = False
    stage1_epochs: int | None = None
    freeze_projector: bool = False
    ramp_epochs: int = 0
    progress: bool | None = None
    patience: int | None = None
    lr_drops: int = 2
    monitor: str = "val_accuracy"

    def __post_init__(self) -> None:
        positive_ints = ("epochs", "batch_size", "guard_window")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}, allowed is an integer >= 1")
        if self.patience is not None and (
            not isinstance(self.patience, int) or isinstance(self.patience, bool)
            or self.patience < 1
        ):  # fmt: skip
            raise ConfigError(f"patience={self.patience!r}, allowed is an integer >= 1 or None")
        for name in ("max_recoveries", "ramp_epochs", "seed", "lr_drops"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r}, allowed is an integer >= 0")
        for name in ("lr", "spike_factor", "feature_spike_factor", "grad_clip"):
            value = getattr(self, name)
            if name == "grad_clip" and value is None:
                continue
            if not isinstance(value, int | float) or not value > 0 or value == float("inf"):
                raise ConfigError(f"{name}={value!r}, allowed is a finite number > 0")
        for name, low, high in (("val_fraction", 0.0, 0.9), ("lr_backoff", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not low < value < high:
                raise ConfigError(f"{name}={value!r}, allowed is a number in ({low}, {high})")
        if self.monitor not in MONITORS:
            raise ConfigError(f"monitor={self.monitor!r}, allowed: {', '.join(MONITORS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}, allowed: {', '.join(OPTIMIZERS)}")
        if not isinstance(self.momentum, int | float) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum!r}, allowed is a number in [0, 1)")
        if not isinstance(self.weight_decay, int | float) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay!r}, allowed is a number >= 0")
        if not isinstance(self.warmup_epochs, int | float) or self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs!r}, allowed is a number >= 0")
        if self.stage1_epochs is not None and not (
            isinstance(self.stage1_epochs, int) and 0 <= self.stage1_epochs < self.epochs
        ):
            raise ConfigError(
                f"stage1_epochs={self.stage1_epochs!r}, allowed is an integer in "
                f"[0, epochs={self.epochs})"
            )

    @property
    def first_stage_epochs(self) -> int:
        """Epochs trained with quantization off (0 unless ``two_stage``)."""
        if not self.two_stage:
            return 0
        return self.epochs // 3 if self.stage1_epochs is None else self.stage1_epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)


@dataclass
class TrainResult:
    """What :func:`stabq.train` returns: the trained model and its per-epoch history."""

    model: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    guard_events: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    best_epoch: int | None = None  # with ``patience``: the epoch the model went back to

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's figures."""
        return self.history[-1] if self.history else {}

    @property
    def max_loss(self) -> float:
        """The largest training loss seen in any step (including undone ones)."""
        return max((h["max_loss"] for h in self.history), default=float("nan"))
