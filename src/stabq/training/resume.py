"""A run's checkpoints: resume one, refuse to overwrite one, drop one that diverged.

:class:`Checkpointer` is what :func:`stabq.train` uses: ``open`` checks that a
fresh run does not overwrite the checkpoint of an unfinished one, or that a
resumed run has the model, options and data of the checkpoint it continues;
``save`` writes one; ``discard`` removes it when the run diverged (resuming
would diverge again). :func:`resume_arguments` gives ``stabq train --resume``
the options the run was started with.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stabq.errors import CheckpointError
from stabq.files import require_directory_path
from stabq.training.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    checkpoint_path,
    data_digest,
    fingerprint,
    load_checkpoint,
    remove_strays,
    save_checkpoint,
)


def refuse_unfinished(directory: str | Path) -> None:
    """A fresh run must not overwrite the checkpoint of an unfinished one."""
    path = checkpoint_path(directory)
    if path.is_file():
        try:
            done = f" (epoch {load_checkpoint(directory).epoch} done)"
        except CheckpointError:
            done = ""
        raise CheckpointError(
            f"{directory}: holds the checkpoint of an unfinished run{done}; finish it with "
            f"stabq train --resume {directory} (Python: train(..., resume=True)), or remove "
            f"{path} to start again"
        )


class Checkpointer:
    """The checkpoints of one run: where they go and what they must match.

    ``resumed`` is the checkpoint to continue from (``resume=True``), else None.
    """

    def __init__(
        self, directory: Path, fingerprint: dict[str, Any], resumed: Checkpoint | None
    ) -> None:
        self.directory, self.fingerprint, self.resumed = directory, fingerprint, resumed
        self.created = not directory.exists()
        self.started = time.perf_counter() - (resumed.seconds if resumed else 0.0)

    @classmethod
    def open(
        cls,
        directory: str | Path | None,
        resume: bool,
        model: nn.Module,
        config: Any,
        data: tuple[Any, Any],
        writer: bool = True,
    ) -> Checkpointer | None:
        """None without ``directory``; else check it holds (``resume``) or lacks a run.

        ``writer=False`` (the ranks other than 0 of a distributed run) only reads:
        None unless resuming, and nothing in ``directory`` is touched.
        """
        if directory is None:
            if resume:
                raise CheckpointError("train: resume=True needs checkpoint_dir")
            return None
        if not writer and not resume:
            return None
        directory = Path(directory)
        require_directory_path(directory, CheckpointError, "a model and its checkpoints")
        digest = data_digest(data[0].x, data[0].y, data[1].x, data[1].y)
        expected = fingerprint(model, config.to_dict(), digest)
        if writer:
            remove_strays(directory)
        if not resume:
            refuse_unfinished(directory)
            return cls(directory, expected, None)
        state = load_checkpoint(directory)
        state.check(expected)
        return cls(directory, expected, state)

    def discard(self) -> None:
        """Delete the checkpoint (and the directory, if this run made it and it is empty).

        It runs while another error is on its way to the user (a failed first write, a
        run that diverged): a directory that cannot be changed (read-only, no permission)
        keeps what it holds, and the error that is on its way stays the one raised.
        """
        with contextlib.suppress(OSError):
            checkpoint_path(self.directory).unlink(missing_ok=True)
        remove_strays(self.directory)
        if self.created:
            with contextlib.suppress(OSError):
                self.directory.rmdir()

    def save(
        self,
        epoch: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        guard: Any,
        generator: torch.Generator,
        history: list[dict[str, Any]],
        run_info: dict[str, Any] | None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Path:
        """Write the state after ``epoch`` epochs (a failed first write leaves nothing).

        The first write of a fresh run is where a directory that cannot be written shows:
        its CheckpointError names the directory and the reason (``Read-only file system``).
        """
        try:
            return save_checkpoint(
                self.directory, epoch=epoch, model=model, optimizer=optimizer, guard=guard,
                generator=generator, history=history, fingerprint=self.fingerprint,
                run_info=run_info, seconds=time.perf_counter() - self.started, scaler=scaler,
            )  # fmt: skip
        except CheckpointError as err:
            if self.resumed is not None or epoch != 0:
                raise
            self.discard()
            reason = getattr(err.__context__, "strerror", None)  # the OSError behind it
            if not reason:
                raise
            raise CheckpointError(
                f"{self.directory}: cannot write there ({reason}); the run's checkpoints and "
                f"its model go to this directory: give one that can be written"
            ) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_arguments(directory: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The command-line options the run in ``directory`` was started with.

    ``given`` are the options typed alongside ``--resume``: each must equal the
    recorded one (``out`` must be ``directory``), else a CheckpointError.
    """
    if not directory.is_dir():
        raise CheckpointError(f"--resume {directory}: no such directory")
    if not checkpoint_path(directory).is_file():
        if (directory / "config.json").is_file():
            raise CheckpointError(
                f"--resume {directory}: that run has finished (its model is saved there); "
                f"nothing to resume"
            )
        raise CheckpointError(
            f"--resume {directory}: no checkpoint there ({CHECKPOINT} is missing); it is not "
            f"the --out of an interrupted stabq train"
        )
    recorded = load_checkpoint(directory).run_info.get("cli")
    if not isinstance(recorded, dict):
        raise CheckpointError(
            f"--resume {directory}: the run was started from Python, not by stabq train; "
            f"resume it with stabq.train(..., checkpoint_dir=..., resume=True)"
        )
    for name, value in given.items():
        if name == "out":
            if Path(value).resolve() != directory.resolve():
                raise CheckpointError(
                    f"--resume {directory} --out {value}: a resumed run writes where it was "
                    f"started; leave --out out"
                )
            continue
        plain = json.loads(json.dumps(value, default=str))
        if plain != recorded.get(name):
            raise CheckpointError(
                f"--resume {directory}: {_flag(name)} {plain!r} conflicts with the interrupted "
                f"run's {recorded.get(name)!r}; leave {_flag(name)} out to finish the run as "
                f"it was started"
            )
    return recorded


__all__ = ["Checkpointer", "refuse_unfinished", "resume_arguments"]
