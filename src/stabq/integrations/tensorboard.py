"""Per-epoch history rows as TensorBoard scalars: one run directory, global step = epoch.

A row is what `stabq.train` appends to its history and hands to `on_epoch`
(`metrics.jsonl` holds the same rows). Each numeric figure becomes the scalar of the tag
`TAGS` names (`train_loss` -> `train/loss`, `usage` -> `codebook/usage`...); a figure
not listed there goes to `other/<key>`, so none is dropped. Booleans are written as 0
or 1; None (`tau` of a quantizer without a temperature) and text are skipped.
TensorBoard stores every scalar as a float32.

A writer starts by telling TensorBoard's readers to drop this directory's earlier events
from the first epoch it has to write, then writes the rows it is given as `history` that
the directory does not already hold: a resumed run continues where its events stop,
with no step twice, and a fresh run in a used directory replaces the old run's events
instead of mixing with them.

Needs the `tensorboard` package (`pip install 'stabq[tensorboard]'`), imported only when
a writer opens:

    with TensorBoardWriter("runs/tb/fsq") as board:
        stabq.train(model, data, on_epoch=board)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from stabq import distributed
from stabq.errors import ConfigError, StabqError
from stabq.files import require_directory_path

OPTION = "--tensorboard"
INSTALL = "pip install 'stabq[tensorboard]'"

TAGS: dict[str, str] = {
    "train_loss": "train/loss",
    "train_ce": "train/cross_entropy",
    "train_aux": "train/aux_loss",
    "max_loss": "train/max_loss",
    "max_feature_norm": "train/max_feature_norm",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "usage": "codebook/usage",
    "fill": "codebook/fill",
    "codes_used": "codebook/codes_used",
    "perplexity": "codebook/perplexity",
    "dead_codes": "codebook/dead_codes",
    "entropy_bits": "codebook/entropy_bits",
    "guard_events": "guard/events",
    "lr": "schedule/lr",
    "tau": "schedule/tau",
    "mix": "schedule/mix",
    "stage": "schedule/stage",
    "quantized": "schedule/quantized",
    "seconds": "time/epoch_seconds",
}
"""The tag of each history figure; a figure not here goes to `other/<key>`."""
STEP = "epoch"  # the row's key that is the global step, not a scalar


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of one history row.

    Args:
        row: a history row (its `epoch` is the step, not a scalar).

    Returns:
        A dict from tag to float: numbers as they are, booleans as 0.0 or 1.0; None and
            text left out.

    Examples:
        >>> from stabq.integrations.tensorboard import scalars
        >>> scalars({"epoch": 3, "train_loss": 0.5, "quantized": True, "tau": None, "x": 2})
        {'train/loss': 0.5, 'schedule/quantized': 1.0, 'other/x': 2.0}
    """
    found = {}
    for key, value in row.items():
        if key == STEP or value is None or not isinstance(value, bool | int | float | np.number):
            continue
        found[TAGS.get(key, f"other/{key}")] = float(value)
    return found


def require_tensorboard() -> type:
    """torch's `SummaryWriter` class, once the `tensorboard` package is found.

    Returns:
        `torch.utils.tensorboard.SummaryWriter`.

    Raises:
        ConfigError: the `tensorboard` package is not installed (one line, saying how to
            install it).

    Examples:
        >>> from stabq.integrations.tensorboard import require_tensorboard
        >>> require_tensorboard().__name__
        'SummaryWriter'
    """
    try:
        import tensorboard  # noqa: F401  (the package the extra installs; torch's writer needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            f"{OPTION} needs the tensorboard package, which is not installed: {INSTALL}"
        ) from None
    return SummaryWriter


def check_log_dir(log_dir: str | Path, *, outside: str | Path | None = None) -> Path:
    """Refuse, before any training, a directory that cannot take event files.

    Args:
        log_dir: a directory, or a new path with no file among its parents, where this
            process may write.
        outside: a directory `log_dir` must not be or lie in (the directory a model or a
            report replaces when it is saved); None: no such check.

    Returns:
        `log_dir` as a `Path`.

    Raises:
        ConfigError: tensorboard is not installed, or `log_dir` cannot take events.

    Examples:
        >>> from stabq.integrations.tensorboard import check_log_dir
        >>> check_log_dir("runs/tb/fsq").as_posix()
        'runs/tb/fsq'
    """
    require_tensorboard()
    log_dir = Path(log_dir)
    try:
        require_directory_path(log_dir, ConfigError, "TensorBoard events")
    except ConfigError as err:
        raise ConfigError(f"{OPTION} {err}") from None
    if outside is not None:
        here, there = log_dir.resolve(), Path(outside).resolve()
        if here == there or there in here.parents:
            raise ConfigError(
                f"{OPTION} {log_dir}: inside --out {outside}, which is replaced when it is "
                f"saved, so the events would be lost; give a directory outside it"
            )
    existing = next(p for p in (log_dir, *log_dir.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{OPTION} {log_dir}: cannot write TensorBoard events there ({existing} is not "
            f"writable)"
        )
    return log_dir


def _cannot_write(log_dir: Path, err: OSError) -> ConfigError:
    return ConfigError(
        f"{OPTION} {log_dir}: cannot write TensorBoard events there ({err.strerror or err})"
    )


def _first_missing(log_dir: Path, history: list[Mapping[str, Any]]) -> int:
    """The first epoch of ``history`` whose scalars ``log_dir`` does not hold as TensorBoard
    reads them (after earlier purges); 1 for a directory without events."""
    if not log_dir.is_dir() or not any(log_dir.glob("*tfevents*")):
        return 1
    from tensorboard.backend.event_processing import event_accumulator as ea

    reader = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    held = {(tag, e.step): e.value for tag in tags for e in reader.Scalars(tag)}
    for row in history:
        for tag, value in scalars(row).items():
            if held.get((tag, row[STEP])) != float(np.float32(value)):
                return int(row[STEP])
    return int(history[-1][STEP]) + 1 if history else 1


def _wait_for_a_later_second(log_dir: Path) -> None:
    """Readers take a directory's event files in name order, and a name starts with the second
    it was made in (then host, pid, a counter): a new file must not share its second with one
    already there, or it may be read before it."""
    seconds = []
    for path in log_dir.glob("events.out.tfevents.*"):
        field = path.name.split(".")[3]
        if field.isdigit():
            seconds.append(int(field))
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(0.05)


class TensorBoardWriter:
    """Write history rows to TensorBoard event files, each flushed at once: an `on_epoch`
    callback for `stabq.train`.

    Call the writer (or `write`) with each new row; close it, or use it as a context
    manager.

    Args:
        log_dir: the run's event directory.
        history: the rows a resumed run restored; those `log_dir` lacks are written
            first.

    Raises:
        ConfigError: tensorboard is not installed, or the events cannot be written.

    Examples:
        >>> import tempfile
        >>> from stabq.integrations.tensorboard import TensorBoardWriter
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with TensorBoardWriter(folder) as board:
        ...         board({"epoch": 1, "train_loss": 0.7, "usage": 0.4})
    """

    def __init__(self, log_dir: str | Path, history: Iterable[Mapping[str, Any]] = ()) -> None:
        summary_writer = require_tensorboard()
        self.log_dir = Path(log_dir)
        rows = list(history)
        first = _first_missing(self.log_dir, rows)
        if self.log_dir.is_dir():
            _wait_for_a_later_second(self.log_dir)
        try:
            self._writer = summary_writer(str(self.log_dir), purge_step=first)
        except OSError as err:
            raise _cannot_write(self.log_dir, err) from None
        for row in rows:
            if row[STEP] >= first:
                self.write(row)

    def write(self, row: Mapping[str, Any]) -> None:
        """Add every scalar of a row at its epoch's step and flush them to disk.

        Args:
            row: a history row, with its `epoch`.

        Raises:
            ConfigError: the events cannot be written.
        """
        step = int(row[STEP])
        try:
            for tag, value in scalars(row).items():
                self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()
        except OSError as err:
            raise _cannot_write(self.log_dir, err) from None

    __call__ = write

    def close(self) -> None:
        """Flush and close the event file (an OSError is a one-line ConfigError)."""
        try:
            self._writer.close()
        except OSError as err:
            raise _cannot_write(self.log_dir, err) from None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(StabqError):  # the block's own error is the one to raise
            self.close()


@contextmanager
def epoch_writer(
    log_dir: str | Path | None, history: Iterable[Mapping[str, Any]] = ()
) -> Iterator[Callable[[Mapping[str, Any]], None] | None]:
    """A context manager giving an `on_epoch` callback that writes to `log_dir`, closed
    when the block ends.

    Args:
        log_dir: the run's event directory; None: no events.
        history: the rows a resumed run restored, as `TensorBoardWriter` takes them.

    Yields:
        The `TensorBoardWriter`; None when `log_dir` is None, and on every rank but 0 of
            a distributed run (rank 0 alone writes).

    Examples:
        >>> from stabq.integrations.tensorboard import epoch_writer
        >>> with epoch_writer(None) as on_epoch:
        ...     print(on_epoch)
        None
    """
    if log_dir is None or not distributed.is_main():
        yield None
        return
    with TensorBoardWriter(log_dir, history) as writer:
        yield writer


def for_train_run(
    log_dir: str | Path | None, out: str | Path, resume: str | Path | None = None
) -> tuple[Path | None, list[dict[str, Any]]]:
    """`stabq train`'s events directory, checked, and the rows a writer there must hold
    before the run goes on.

    Args:
        log_dir: the `--tensorboard` directory; None: none given.
        out: the model directory (`--out`), which `log_dir` must not be or lie in.
        resume: the `--resume` checkpoint directory; None: a new run.

    Returns:
        `(directory or None, rows)`: for a new run `log_dir` and no rows; for a resumed
            one, the checkpoint's history, and without `log_dir` the directory the
            interrupted run wrote to, if any.

    Raises:
        ConfigError: a directory that cannot take events.
        CheckpointError: a `resume` directory without a readable checkpoint.

    Examples:
        >>> from stabq.integrations.tensorboard import for_train_run
        >>> for_train_run(None, "runs/fsq")
        (None, [])
    """
    if resume is None:
        return (None if log_dir is None else check_log_dir(log_dir, outside=out)), []
    from stabq.training.checkpoint import load_checkpoint

    state = load_checkpoint(resume)
    recorded = state.run_info.get("cli", {}).get("tensorboard")
    chosen = log_dir if log_dir is not None else recorded
    if chosen is None:
        return None, []
    return check_log_dir(chosen, outside=resume), list(state.document["history"])


def run_dir(log_dir: str | Path, method: str, seed: int) -> Path:
    """Where `stabq.compare` writes one run's events: `log_dir/<method>/seed-<seed>`.

    Args:
        log_dir: the comparison's `tensorboard` directory.
        method: the method's name.
        seed: the run's seed.

    Examples:
        >>> from stabq.integrations.tensorboard import run_dir
        >>> run_dir("runs/tb", "fsq", 1).as_posix()
        'runs/tb/fsq/seed-1'
    """
    return Path(log_dir) / method / f"seed-{seed}"


__all__ = [
    "TAGS",
    "TensorBoardWriter",
    "check_log_dir",
    "epoch_writer",
    "for_train_run",
    "require_tensorboard",
    "run_dir",
    "scalars",
]
