"""Model directories: ``model.safetensors`` + ``config.json`` (+ ``metrics.jsonl``, plots).

Nothing is unpickled: weights are safetensors, everything else JSON. A save
is atomic: the directory is built under a temporary name beside the target,
every file fsynced, then renamed into place, so a crash leaves either the old
model or the new one, never half of one. ``config.json`` records the SHA-256
of the weights file and the weights record the SHA-256 of the model section
of ``config.json``, so an altered file is refused at load.

A user's encoder is saved by its factory reference (``package.module:factory``):
its weights go to the safetensors file with the rest, and :func:`load` imports
the factory again and rebuilds it, which runs code the model directory names:
only with ``trust_encoder=True`` (``--trust-encoder``), or for a model this very
process saved (:mod:`stabq.model.trust`). Format 1 is a model with the MLP encoder (as
every model was before encoders), format 2 one with another encoder.

Before building anything, :func:`load` checks every size in ``config.json``
against the shapes the weights' safetensors header declares
(:mod:`stabq.model.weights_check`): a crafted config cannot make it allocate more than
the weights hold.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from stabq.errors import ConfigError, ModelFileError, StabqError, is_int
from stabq.files import atomic_directory, fsync_file, write_text
from stabq.model.classifier import BottleneckClassifier
from stabq.model.encoders import is_reference
from stabq.model.trust import remember_saved, require_trusted, saved_here
from stabq.model.weights_check import check_fits_weights

FORMAT = "stabq-model"
FORMAT_VERSION = 2  # the newest this stabq reads; an MLP model is still written as 1
WEIGHTS, CONFIG, METRICS, PLOT = "model.safetensors", "config.json", "metrics.jsonl", "training.png"


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """:func:`stabq.report.plot_history`, imported on the first save that plots: matplotlib
    is not imported with stabq."""
    from stabq.compare.plots import plot_history as draw

    return draw(history, path, title)


def _version() -> str:
    from stabq._version import __version__

    return __version__


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_digest(section: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()


def save_model(
    model: BottleneckClassifier,
    directory: str | Path,
    *,
    classes: list[str],
    history: list[dict[str, Any]] | None = None,
    train_config: dict[str, Any] | None = None,
) -> Path:
    """Save a model to a directory: `model.safetensors`, `config.json`, and its history.

    Nothing is pickled: the weights are safetensors, everything else JSON, each file
    checksummed so that `load` refuses an altered one. The save is atomic: the directory
    is built under a temporary name beside the target, then renamed into place,
    replacing an earlier model there; a crash leaves the old model or the new one. This
    process remembers, in memory only, that it wrote this `config.json` there: `load`
    of it needs no `trust_encoder`, even for a factory encoder of the user's.

    Args:
        model: the model to save (its encoder built-in or a `"package.module:factory"`).
        directory: the model directory to write.
        classes: the class names, one per class, in the order of the logits.
        history: per-epoch rows (`TrainResult.history`), written to `metrics.jsonl` and
            plotted to `training.png`; None: neither.
        train_config: the training options to record (`TrainConfig.to_dict()`).

    Returns:
        The directory, as a `Path`.

    Raises:
        StabqError: `classes` does not hold one name per class.
        ConfigError: the encoder is a module instance, which only pickle could save.
        ModelFileError: the directory cannot be written.

    Examples:
        >>> import tempfile, stabq
        >>> model = stabq.BottleneckClassifier(4, 2, "fsq", hidden=16, bottleneck_dim=8)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = stabq.save_model(model, f"{folder}/fsq", classes=["no", "yes"])
        ...     print(sorted(p.name for p in path.iterdir()))
        ['config.json', 'model.safetensors']
    """
    target = Path(directory)
    if len(classes) != model.num_classes:
        raise StabqError(f"{len(classes)} class names for a model of {model.num_classes} classes")
    if not model.saveable:
        raise ConfigError(
            f"the model's encoder is a module instance ({model.arch['encoder'][9:]}): saving "
            f"it would need pickle, which stabq never uses; build the model with "
            f"encoder='package.module:factory' (a callable (input_shape, out_dim) -> "
            f"nn.Module) to save it"
        )
    with atomic_directory(target, ModelFileError, "the model") as tmp:
        section = {
            "model": model.config(),
            "classes": list(classes),
            "feature_mean": model.feature_mean.tolist(),
            "feature_std": model.feature_std.tolist(),
        }
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        meta = {"format": FORMAT, "config_sha256": _model_digest(section)}
        save_file(state, str(tmp / WEIGHTS), metadata=meta)
        fsync_file(tmp / WEIGHTS)
        config = {
            "format": FORMAT,
            "format_version": 1 if model.arch["encoder"] == "mlp" else FORMAT_VERSION,
            "stabq_version": _version(),
            **section,
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "train_config": train_config or {},
        }
        write_text(tmp / CONFIG, json.dumps(config, indent=2))
        written = (tmp / CONFIG).read_bytes()
        if history:
            write_text(tmp / METRICS, "".join(json.dumps(row) + "\n" for row in history))
            plot_history(history, tmp / PLOT, title=f"{model.arch['quantizer']}")
    remember_saved(target, written)  # this process may load it back without trust_encoder
    return target


def read_config(directory: str | Path) -> dict[str, Any]:
    """The checked ``config.json`` of a model directory."""
    return _read_config(Path(directory))[0]


def _read_config(directory: Path) -> tuple[dict[str, Any], bytes]:
    """The checked ``config.json`` of ``directory``, and the very bytes it was parsed from."""
    path = directory / CONFIG
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "no such model directory"
        raise ModelFileError(f"{directory}: {what}")
    if not path.is_file():
        if (directory / "checkpoint.safetensors").is_file():
            raise ModelFileError(
                f"{directory}: a training run that has not finished (no model yet); "
                f"finish it with stabq train --resume {directory}"
            )
        raise ModelFileError(f"{directory}: not a stabq model ({CONFIG} is missing)")
    try:
        raw = path.read_bytes()
        config = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # JSON and UTF-8 errors are ValueErrors
        detail = "nested too deeply" if isinstance(err, RecursionError) else err
        raise ModelFileError(f"{path}: unreadable ({detail})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a stabq model config")
    version = config.get("format_version")
    if not is_int(version) or version < 1:
        raise ModelFileError(f"{path}: format_version={version!r}, expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: written by stabq {config.get('stabq_version', '?')} (model format "
            f"{version}); this stabq {_version()} reads format {FORMAT_VERSION}: upgrade stabq"
        )
    return config, raw


def load(directory: str | Path, *, trust_encoder: bool = False) -> BottleneckClassifier:
    """Load a model saved by `save_model` or `stabq train`, in eval mode.

    Before any module is built, the sizes in `config.json` are checked against the
    tensor shapes the weights' header declares, so a crafted config cannot make it
    allocate what the weights do not hold; the checksums must match.

    Args:
        directory: the model directory.
        trust_encoder: allow a model whose encoder is a factory of the user's
            (`package.module:factory`): loading imports that module and runs it, so
            pass True only for a model from a source you trust. Not needed for the
            built-in encoders, nor for a model this process saved itself.

    Returns:
        The `BottleneckClassifier`, in eval mode; its class names are `model.classes`.

    Raises:
        UntrustedEncoderError: a factory encoder, and neither `trust_encoder` nor this
            process's own save; raised before anything is imported.
        ModelFileError: a missing, altered, inconsistent or newer model (or an
            unfinished training run's directory).

    Examples:
        >>> import tempfile, torch, stabq
        >>> model = stabq.BottleneckClassifier(4, 2, "fsq", hidden=16, bottleneck_dim=8)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     loaded = stabq.load(stabq.save_model(model, folder, classes=["no", "yes"]))
        >>> loaded.classes, loaded.training
        (['no', 'yes'], False)
        >>> logits, out = loaded(torch.randn(3, 4))
    """
    directory = Path(directory)
    config, raw = _read_config(directory)
    section = _checked_section(directory, config)
    require_trusted(
        section["model"].get("encoder"),
        directory,
        trusted=trust_encoder or saved_here(directory, raw),
    )
    weights = directory / WEIGHTS
    try:
        check_fits_weights(directory / CONFIG, weights, section["model"])
        classes, num_classes = section["classes"], section["model"].get("num_classes")
        if len(classes) != num_classes:
            raise ModelFileError(
                f"{directory / CONFIG}: {len(classes)} class names for {num_classes} classes"
            )
        model = BottleneckClassifier.from_config(section["model"])
        _load_weights(model, weights, section["model"].get("encoder"))
    except ModelFileError:
        raise
    except (
        KeyError, ValueError, TypeError, RuntimeError, SafetensorError, StabqError, OSError
    ) as err:  # fmt: skip
        detail = " ".join(str(err).split())  # torch's state-dict errors span many lines
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise ModelFileError(f"{directory}: cannot rebuild the model ({detail})") from None
    model.classes = list(classes)
    model.eval()
    return model


def _load_weights(model: BottleneckClassifier, weights: Path, encoder: object) -> None:
    """Load ``weights`` into ``model``; a user's factory that now builds other shapes is
    named (the shapes of the rest were checked against the header already)."""
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as err:
        if not is_reference(encoder):
            raise
        detail = " ".join(str(err).split())
        raise ModelFileError(
            f"{weights.parent}: the encoder that {encoder} builds no longer fits the saved "
            f"weights ({detail[:300]})"
        ) from None


def _checked_section(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The model section of ``config``, once the weights' checksum, the digest of the
    section the weights record and the section's own form have been checked."""
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ModelFileError(f"{directory}: {WEIGHTS} is missing")
    if _sha256(weights) != config.get("weights_sha256"):
        raise ModelFileError(f"{weights}: altered or corrupted (checksum differs from {CONFIG})")
    try:
        section = {k: config[k] for k in ("model", "classes", "feature_mean", "feature_std")}
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except (KeyError, SafetensorError, OSError) as err:
        detail = " ".join(str(err).split())[:300]
        raise ModelFileError(f"{directory}: cannot rebuild the model ({detail})") from None
    if meta.get("config_sha256") != _model_digest(section):
        raise ModelFileError(f"{directory / CONFIG}: altered (does not match the weights)")
    classes = section["classes"]
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ModelFileError(f"{directory / CONFIG}: classes must be a list of names")
    if not isinstance(section["model"], dict):
        raise ModelFileError(f"{directory / CONFIG}: model must be a mapping")
    return section


def load_history(directory: str | Path) -> list[dict[str, Any]]:
    """The per-epoch figures saved with a model (empty when there are none)."""
    path = Path(directory) / METRICS
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{path}: unreadable ({err})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            row = None
        if not isinstance(row, dict):
            raise ModelFileError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


__all__ = ["load", "load_history", "read_config", "save_model"]
