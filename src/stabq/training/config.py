"""What a training run is told (TrainConfig) and what it reports (TrainResult)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from stabq.errors import ConfigError, check

OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")  # Lightning's names
MONITORS = ("val_accuracy", "val_loss")


@dataclass
class TrainConfig:
    """The options of a training run (`stabq.train`), checked when it is built.

    Optimisation: AdamW (`lr`, `weight_decay`), or plain SGD with `momentum`
    (`optimizer="sgd"`, as much user code does), a cosine schedule with linear warm-up
    over `warmup_epochs` (restarted for stage 2 of two-stage training), and `grad_clip`
    on the global gradient norm.

    Guards (`guards=True`): a batch with non-finite inputs, or standardised inputs above
    `feature_spike_factor` x the recent batches', is skipped; a step whose loss is
    non-finite or above `spike_factor` x the median of the last `guard_window` losses,
    whose bottleneck feature norm is above `feature_spike_factor` x its minimum over 10
    steps, or whose gradient norm is not finite is undone: the last good weights,
    buffers and optimiser state come back and the learning rate is scaled by
    `lr_backoff` (it doubles back after every `guard_window` clean steps, never to a
    rate that failed twice); a lost epoch goes back to the best one. More than
    `max_recoveries` recoveries without a clean epoch between them stop the run with a
    `TrainingError`.

    Length: `epochs` epochs on the cosine schedule, unless `patience` is set: then each
    stage trains at a constant rate after the warm-up; `patience` epochs without a
    better `monitor` figure drop the rate 10x and start the count again; once it has
    dropped `lr_drops` times, `patience` more such epochs end the stage (`epochs` is the
    ceiling), and the model goes back to its best epoch.

    Precision (`precision`, Lightning's names): `"32"` trains in float32;
    `"bf16-mixed"` runs each forward (training and validation) under
    `torch.autocast` in bfloat16; `"16-mixed"` in float16, its backward through a
    `torch.amp.GradScaler` whose overflow steps are skipped and counted as the
    scaler's (`scaler_skips` in the history), not as guard recoveries; a non-finite
    loss is still undone by the guard. Weights, the
    optimiser, the loss and the quantizer's math (codebooks, distances) stay float32.

    Attributes:
        epochs: epochs to train (an integer >= 1); with `patience`, the most.
        batch_size: rows a step (an integer >= 1); under torch.distributed, the global
            batch, split over the ranks.
        lr: the peak learning rate, a finite number > 0.
        weight_decay: weight decay, a number >= 0.
        warmup_epochs: epochs of linear warm-up (a number >= 0, fractions allowed).
        grad_clip: clip the global gradient norm to this (a finite number > 0); None:
            no clipping.
        optimizer: `"adamw"` or `"sgd"`.
        momentum: SGD's momentum, a number in [0, 1); unused by AdamW.
        seed: an integer >= 0 that seeds the weights, the batch order and the
            validation split.
        device: `"auto"` (CUDA when available, else the CPU), `"cpu"`, `"cuda"`,
            `"cuda:N"` or `"mps"`; `stabq.train` refuses a device this machine lacks.
        compile: run the quantizer through `torch.compile` (it stays compiled after
            training).
        val_fraction: the stratified share of the training data held out for
            validation when no validation data is given, in (0, 0.9).
        guards: turn the stability guards on (see above).
        spike_factor: a loss above this times the recent median is a bad step (> 0).
        feature_spike_factor: a feature norm above this times its recent minimum is a
            bad step, an input norm above this times the recent median a skipped batch
            (> 0).
        guard_window: the steps the recent loss median covers, and the clean steps
            after which the rate doubles back (an integer >= 1).
        max_recoveries: recoveries allowed without a clean epoch between them before
            the run stops (an integer >= 0).
        lr_backoff: the factor the rate is scaled by on each recovery, in (0, 1).
        two_stage: train `stage1_epochs` with quantization off, seed the codebooks by
            k-means on the learned features, then train the remaining epochs quantized.
        stage1_epochs: epochs of stage 1, an integer in [0, epochs); default None: a
            third of `epochs`; 0 starts at the seeding (for a model already trained
            continuously).
        freeze_projector: keep the encoder fixed in stage 2.
        ramp_epochs: over this many epochs of the quantized stage, feed the head
            `mix * quantized + (1 - mix) * continuous` with `mix` rising linearly from 0
            to 1 (an integer >= 0; 0: no ramp).
        progress: show progress bars (None: only when the output is a terminal).
        patience: train each stage until `monitor` has not improved for this many
            epochs after its last rate drop (an integer >= 1); None: a fixed length of
            `epochs` on the cosine schedule.
        lr_drops: how many 10x rate drops `patience` allows before the stage ends (an
            integer >= 0).
        monitor: the figure `patience` watches: `"val_accuracy"` (the validation loss
            breaks ties) or `"val_loss"`.
        precision: `"32"` (float32), `"bf16-mixed"` or `"16-mixed"` (see above).

    Raises:
        ConfigError: a field outside the range given above.

    Examples:
        >>> import stabq
        >>> config = stabq.TrainConfig(epochs=30, lr=1e-3, two_stage=True)
        >>> config.first_stage_epochs
        10
        >>> stabq.TrainConfig.from_dict({"epochs": 5, "patience": 2}).to_dict()["patience"]
        2
        >>> stabq.TrainConfig(lr=0)
        Traceback (most recent call last):
        stabq.errors.ConfigError: lr=0, allowed is a finite number > 0
        >>> stabq.TrainConfig(precision="bf16")
        Traceback (most recent call last):
        stabq.errors.ConfigError: precision='bf16', allowed: 32, bf16-mixed, 16-mixed
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
    precision: str = "32"

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
        check(
            self.precision in PRECISIONS,
            f"precision={self.precision!r}, allowed: {', '.join(PRECISIONS)}",
        )
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
        """Every field by name, JSON-serialisable: what `from_dict` takes back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a mapping of field names (`to_dict`'s output, a JSON file's).

        Args:
            values: fields by name; those left out keep their defaults.

        Raises:
            ConfigError: a name that is not a field, or a value outside its range.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)


@dataclass
class TrainResult:
    """What `stabq.train` returns: the trained model and its per-epoch history.

    Attributes:
        model: the trained `BottleneckClassifier`, in eval mode.
        history: one dict an epoch, as `metrics_path` and `on_epoch` get them: `epoch`
            (from 1), `stage`, `quantized`, `train_loss`, `train_ce`, `train_aux`,
            `val_loss`, `val_accuracy`, the codebook figures `usage`, `fill`,
            `codes_used`, `perplexity`, `dead_codes` (None for a grid), `entropy_bits`,
            `tau`, `mix`, `max_feature_norm`, `max_loss`, `lr`, `guard_events` (how many
            this epoch), `alerts` (the `CollapseMonitor` messages of this epoch),
            `stage_end` and `seconds`; with `precision="16-mixed"` also `scaler_skips`
            (the steps its GradScaler skipped this epoch).
        guard_events: each batch skipped or step undone: `step`, `epoch`, `reason` and
            the `lr_scale` after it.
        seconds: the run's training time (a resumed run's included).
        best_epoch: with `patience`, the epoch the model went back to; else None.

    Examples:
        >>> import numpy as np, stabq
        >>> x = np.random.default_rng(0).normal(size=(120, 4)).astype("float32")
        >>> y = (x[:, 0] > 0).astype("int64")
        >>> model = stabq.BottleneckClassifier(4, 2, "fsq", hidden=16, bottleneck_dim=8)
        >>> result = stabq.train(model, (x, y), config=stabq.TrainConfig(epochs=2, progress=False))
        >>> len(result.history), result.final["epoch"], result.guard_events
        (2, 2, [])
    """

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
