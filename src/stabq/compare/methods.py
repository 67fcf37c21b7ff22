"""What a comparison runs: the methods (a preset and how it is trained), the comparison
presets, and the plan of one comparison (methods, seeds, training options, run count)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stabq.compare.scenarios import EXPLODE_CONFIG, STABQ_PRESETS, explode_runs
from stabq.errors import ConfigError
from stabq.training.config import TrainConfig

RUN_SET = ("seed", "two_stage", "epochs", "patience", "progress")  # set by compare for each run
# how default and quick train each run: until the validation accuracy stops improving
# (stabq.training.stopping), at most 150 epochs
UNTIL_BEST = {"epochs": 150, "patience": 5}


@dataclass(frozen=True)
class Method:
    """One contender: a preset, its options, and how it is trained."""

    name: str
    quantizer: str
    options: dict[str, Any] = field(default_factory=dict)
    two_stage: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("none", "none"),
        Method("vq-ema", "vq-ema"),
        Method("vq", "vq"),
        Method("vq-1024", "vq", {"codebook_size": 1024}),
        Method("rvq", "rvq"),
        Method("fsq", "fsq"),
        Method("fsq-plain", "fsq-plain"),
        Method("fsp", "fsp"),
        Method("ifsq", "ifsq"),
        Method("gumbel", "gumbel"),
        Method("gumbel-reinmax", "gumbel-reinmax"),
        Method("pq", "pq"),
        Method("fsq-2stage", "fsq", two_stage=True),
        Method("vq-2stage", "vq", two_stage=True),
        Method("simvq", "simvq"),
        Method("rfsq", "rfsq"),
        Method("lfq", "lfq"),
        Method("bsq", "bsq"),
        Method("diveq", "diveq"),
        Method("rvq-diveq", "rvq-diveq"),
        # the explode preset's baselines (stabq.scenarios): they reproduce the failure
        Method("vq-ema-sum", "vq-ema", {"commitment_reduction": "sum"}),
        Method(
            "vq-ema-tutorial",
            "vq-ema",
            {"commitment_reduction": "sum", "cluster_size_init": "zeros"},
        ),
    ]
}
# the field's newer quantizers: in the default preset beside the classic ones
NEWER = ["simvq", "rfsq", "lfq", "bsq", "diveq", "rvq-diveq", "fsp", "ifsq", "gumbel-reinmax"]
DEFAULT_METHODS = [
    "none", "vq-ema", "vq", "rvq", "fsq", "gumbel", "pq", "fsq-2stage", "vq-2stage", "vq-1024",
    *NEWER,
]  # fmt: skip
# every preset build_quantizer lists, so that each is judged under a high learning rate
STRESS_METHODS = ["none", *STABQ_PRESETS]
QUICK_METHODS = ["none", "vq-ema", "vq", "rvq", "fsq", "gumbel"]
PRESETS: dict[str, dict[str, Any]] = {
    # each run until it stops improving
    "default": {"methods": DEFAULT_METHODS, "seeds": 2, **UNTIL_BEST, "config": {}},
    # the first look (make demo): the baseline that collapses, the main repairs, 2 seeds
    "quick": {"methods": QUICK_METHODS, "seeds": 2, **UNTIL_BEST, "config": {}},
    # vanilla VQ-EMA's failure: a high learning rate, 512 codes, no guards anywhere; the
    # failures of fixed-length runs, so stress and explode keep their fixed length
    "stress": {
        "methods": STRESS_METHODS,
        "seeds": 3,
        "epochs": 20,
        "patience": None,
        "config": {"lr": 3e-2, "guards": False, "warmup_epochs": 0.0},
    },
    # the user's explosion (stabq.scenarios): each scenario's baseline with the stabq
    # presets under SGD momentum 0.9, lr 1e-2, guards off; then the baselines guarded
    "explode": {
        "methods": STABQ_PRESETS,
        "seeds": 3,
        "epochs": 10,
        "patience": None,
        "config": EXPLODE_CONFIG,
    },
}


def resolve_methods(names: str | Sequence[str]) -> list[Method]:
    """Methods by name, in the order given: a list, or a comma-separated string as
    ``--methods`` takes it.

    Raises :class:`ConfigError` for no names, an empty entry (``"fsq,"``), a name given
    twice (it would count as another seed) or an unknown name (listing the known ones).

    Example::

        [m.quantizer for m in resolve_methods("fsq,vq-2stage")]  # ['fsq', 'vq']
    """
    given = names.split(",") if isinstance(names, str) else list(names)
    names = [n.strip() if isinstance(n, str) else n for n in given]
    shown = ",".join(map(str, given))
    if not names or any(n == "" for n in names):
        raise ConfigError(
            f"--methods {shown!r}: an empty method name; give comma-separated names from: "
            f"{', '.join(METHODS)}"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"--methods {shown}: {', '.join(twice)} named more than once (use --seeds for "
            "more runs of a method)"
        )
    unknown = [str(n) for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(
            f"--methods {shown}: unknown {', '.join(unknown)}; allowed: {', '.join(METHODS)}"
        )
    return [METHODS[n] for n in names]


def planned_runs(
    preset: str = "default", methods: str | Sequence[str] | None = None, seeds: int | None = None
) -> int:
    """How many runs :func:`compare` trains for these arguments (``explode`` trains each
    scenario's baseline twice more: guards off, then on). Raises as compare does."""
    chosen, seeds, _ = plan(preset, methods, seeds, None, None, None, None)
    return explode_runs(len(chosen), seeds) if preset == "explode" else len(chosen) * seeds


def plan(
    preset: str,
    methods: str | Sequence[str] | None,
    seeds: int | None,
    epochs: int | None,
    progress: bool | None,
    options: Mapping[str, Any] | None,
    patience: int | None = None,
) -> tuple[list[Method], int, TrainConfig]:
    """The methods, seeds and training options of a comparison, checked (a one-line
    :class:`ConfigError` for an unknown preset, method or option, a method named twice,
    seeds < 1, or an option compare sets for each run).

    ``epochs`` alone is a fixed length; ``patience`` trains until the validation accuracy
    stops improving, with ``epochs`` (else the preset's) as the ceiling; neither: the
    preset's way."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: allowed: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    chosen = resolve_methods(spec["methods"] if methods is None else methods)
    seeds = spec["seeds"] if seeds is None else seeds
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"--seeds {seeds!r}: allowed is an integer >= 1")
    options = dict(options or {})
    taken = sorted(set(options) & set(RUN_SET))
    if taken:
        raise ConfigError(
            f"--option {taken[0]}: compare sets it for each run (seeds run 0, 1, ...; "
            "two-stage is a method; epochs, patience and progress have options of their own)"
        )
    if patience is None and epochs is None:
        patience = spec["patience"]
    epochs = spec["epochs"] if epochs is None else epochs
    run = {**spec["config"], **options, "epochs": epochs, "patience": patience}
    run["progress"] = progress
    return chosen, seeds, TrainConfig.from_dict(run)


__all__ = [
    "DEFAULT_METHODS", "METHODS", "PRESETS", "QUICK_METHODS", "STRESS_METHODS", "UNTIL_BEST",
    "Method", "plan", "planned_runs", "resolve_methods",
]  # fmt: skip
