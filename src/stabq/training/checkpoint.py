"""Checkpoints: all a training run depends on, so that a killed run finishes exactly.

A checkpoint is one file, ``DIR/checkpoint.safetensors``, written before the
first epoch and at the end of every epoch through a temporary file, fsync and
rename: a kill at any moment leaves the previous checkpoint or the new one,
whole. It holds

    tensors (safetensors)  model state (weights and buffers: EMA codebooks,
                           dead-code counters, k-means flags, norm statistics),
                           optimiser state, the guard's last good snapshot and
                           best epoch's state of both, and the RNG states (torch, data order, CUDA:
                           uint8; numpy's MT19937 key: int64)
    JSON (its metadata)    epochs done, the history so far, the guard's
                           counters, recent losses and events, optimiser
                           hyper-parameters, the fp16 GradScaler's scale and
                           growth count ("16-mixed"), numpy's and Python's RNG
                           positions, and a fingerprint of the model, the
                           options and the data that resuming must match

so nothing is unpickled. Resumed on the same device and thread count, a run
ends with bitwise the weights and the history (less the wall-clock
``seconds``) of a run that was never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as tensors_to_bytes
from torch import nn

from stabq.data.rows import Rows
from stabq.errors import CheckpointError
from stabq.files import write_chunks

CHECKPOINT = "checkpoint.safetensors"
FORMAT, FORMAT_VERSION = "stabq-checkpoint", 1
# Test-only hook, "EPOCH:SECONDS": sleep that long halfway through writing the
# checkpoint of that epoch, so that a test can kill the process mid-write.
PAUSE_ENV = "STABQ_TEST_CHECKPOINT_PAUSE"
FREE_OPTIONS = ("device", "progress")  # TrainConfig fields a resumed run may change
# the (model, optimiser) states to go back to: the guard's, and the plateau's best epoch
SAVED_STATES = ("snapshot", "anchor", "best")
PREDATED = {"precision": "32"}  # options a checkpoint may predate, as they then were


def checkpoint_path(directory: str | Path) -> Path:
    """Where the checkpoint of a run writing to ``directory`` lives."""
    return Path(directory) / CHECKPOINT


def data_digest(*arrays: np.ndarray | Rows) -> str:
    """SHA-256 over the dtypes, shapes and bytes of ``arrays``; :class:`~stabq.rows.Rows`
    are read in chunks and digest as the same rows held in memory would."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, Rows):
            a.digest_into(h)
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the bytes of tobytes(), not a copy of them
    return h.hexdigest()


def fingerprint(model: nn.Module, options: dict[str, Any], digest: str) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: model, options, data."""
    kept = {k: v for k, v in options.items() if k not in FREE_OPTIONS}
    return json.loads(json.dumps({"model": model.config(), "options": kept, "data": digest}))


def _optimizer_split(prefix: str, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{pid}.{name}"] = value
            else:
                plain.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _optimizer_join(prefix: str, meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    head = prefix + "."
    for key, value in tensors.items():
        if key.startswith(head):
            pid, name = key[len(head) :].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["plain"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state(), "rng.data": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    plain = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.data"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = plain["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def _halves(data: bytes, epoch: int) -> Iterator[bytes]:
    """``data`` in two pieces, sleeping between them when the test-only hook asks."""
    middle = len(data) // 2
    yield data[:middle]
    at, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
    if at == str(epoch):
        time.sleep(float(seconds))
    yield data[middle:]


def remove_strays(directory: str | Path) -> None:
    """Delete temporary files left by a checkpoint write that was killed."""
    for stray in Path(directory).glob(f".{CHECKPOINT}.*"):
        with contextlib.suppress(OSError):  # a read-only directory keeps them, harmlessly
            stray.unlink()


def save_checkpoint(
    directory: str | Path,
    *,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    guard: Any,
    generator: torch.Generator,
    history: list[dict[str, Any]],
    seconds: float,
    fingerprint: dict[str, Any],
    run_info: dict[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write the state after ``epoch`` epochs to ``directory`` atomically (with ``scaler``,
    the fp16 GradScaler's state too)."""
    path = checkpoint_path(directory)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim_tensors, optim_meta = _optimizer_split("optim", optimizer.state_dict())
    guard_state = guard.state_dict()
    saved_meta = {}
    for name in SAVED_STATES:
        saved = guard_state.pop(name)
        saved_meta[name] = None
        if saved is not None:
            tensors.update({f"{name}.{k}": v for k, v in saved[0].items()})
            saved_tensors, saved_meta[name] = _optimizer_split(f"{name}_optim", saved[1])
            tensors.update(saved_tensors)
    rng_tensors, rng_plain = _rng_state(generator)
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "epochs": fingerprint["options"].get("epochs"),
        "seconds": seconds,
        "history": history,
        "optimizer": optim_meta,
        "guard": {**guard_state, "optimizers": saved_meta},
        "rng": rng_plain,
        "scaler": None if scaler is None else scaler.state_dict(),
        "fingerprint": fingerprint,
        "run": run_info or {},
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    data = tensors_to_bytes(tensors, metadata={"format": FORMAT, "state": json.dumps(document)})
    what = f"the checkpoint of epoch {epoch}" + (" (the previous one is kept)" if epoch else "")
    write_chunks(path, _halves(data, epoch), CheckpointError, what)
    return path


@dataclass
class Checkpoint:
    """A checkpoint read back: its JSON ``document`` and its ``tensors`` (on the CPU)."""

    path: Path
    document: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def epoch(self) -> int:
        """Epochs done when it was written."""
        return int(self.document["epoch"])

    @property
    def seconds(self) -> float:
        """Training seconds spent before it was written."""
        return float(self.document["seconds"])

    @property
    def run_info(self) -> dict[str, Any]:
        return self.document.get("run", {})

    def check(self, expected: dict[str, Any]) -> None:
        """Refuse to resume a model, options or data other than the checkpoint's."""
        found = self.document["fingerprint"]
        for section in ("model", "options"):
            ours, theirs = expected[section], found[section]
            if section == "options":
                theirs = {**PREDATED, **theirs}
            for key in sorted(set(ours) | set(theirs)):
                if ours.get(key) != theirs.get(key):
                    raise CheckpointError(
                        f"{self.path}: the interrupted run had {section} {key}="
                        f"{theirs.get(key)!r}, this one has {ours.get(key)!r}; resume with "
                        f"the same settings"
                    )
        if expected["data"] != found["data"]:
            raise CheckpointError(
                f"{self.path}: the training or validation data differ from the interrupted "
                f"run's; resume with the same data"
            )

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        guard: Any,
        generator: torch.Generator,
        scaler: torch.amp.GradScaler | None = None,
    ) -> list[dict[str, Any]]:
        """Put the model, optimiser, guard, RNGs (and ``scaler``'s state) back; return the
        history so far."""
        doc, tensors = self.document, self.tensors
        device = next(iter(model.state_dict().values())).device

        def part(prefix: str) -> dict[str, torch.Tensor]:
            n = len(prefix)
            return {k[n:]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}

        try:
            model.load_state_dict(part("model."), strict=True)
            optimizer.load_state_dict(_optimizer_join("optim", doc["optimizer"], tensors))
            guard_doc = dict(doc["guard"])
            saved_meta = guard_doc.pop("optimizers")
            for name in SAVED_STATES:
                guard_doc[name] = None
                if saved_meta.get(name) is not None:
                    optim = _optimizer_join(f"{name}_optim", saved_meta[name], tensors)
                    optim["state"] = {
                        pid: {k: v.to(device) for k, v in values.items()}
                        for pid, values in optim["state"].items()
                    }
                    guard_doc[name] = (part(f"{name}."), optim)
            guard.load_state_dict(guard_doc)
            _set_rng_state(tensors, doc["rng"], generator)
            if scaler is not None and doc.get("scaler"):
                scaler.load_state_dict(doc["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            message = " ".join(str(err).split())[:300]
            raise CheckpointError(f"{self.path}: cannot restore the run ({message})") from None
        return list(doc["history"])


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read ``directory``'s checkpoint; a missing or damaged one is a CheckpointError."""
    path = checkpoint_path(directory)
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: no checkpoint to resume from ({CHECKPOINT} is missing)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        document = json.loads(meta["state"])
    except (OSError, SafetensorError, KeyError, ValueError) as err:
        message = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: unreadable or damaged ({message})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a stabq checkpoint")
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {document.get('format_version')!r}, this stabq reads "
            f"{FORMAT_VERSION}"
        )
    return Checkpoint(path, document, tensors)


__all__ = [
    "CHECKPOINT",
    "Checkpoint",
    "checkpoint_path",
    "data_digest",
    "fingerprint",
    "load_checkpoint",
    "remove_strays",
    "save_checkpoint",
]
