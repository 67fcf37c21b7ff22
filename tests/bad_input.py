"""Helpers shared by the bad-input batteries (test_bad_data.py, test_bad_models.py).

``assert_user_error`` is the contract of a refused command: exit status 2, one
stderr line ``stabq: error: ...`` holding every fragment, no traceback.
``Payload`` is a pickle whose ``__reduce__`` creates a marker file when it is
unpickled: a loader that never unpickles leaves no marker. ``read_only`` makes
a directory read-only for this process (every platform, any user);
``mounted_tmpfs`` gives a real filesystem to remount read-only (root only).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_tensors
from safetensors.torch import save_file as save_tensors
from typer.testing import CliRunner

from stabq.cli import app
from stabq.saving import _model_digest

runner = CliRunner()


def cli(*args: object):
    """Run ``stabq ARGS`` in this process."""
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> str:
    """Exit status 2 and exactly one stderr line, ``stabq: error: ...`` naming the problem."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("stabq: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == "", result.stdout
    return lines[0]


def run_stabq(*args: object) -> subprocess.CompletedProcess:
    """Run ``python -m stabq ARGS`` as a real process (2 minutes at most: a hang fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "stabq", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


class Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``); pickling it runs nothing."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def config_of(d: Path) -> dict:
    """The ``config.json`` of model directory ``d``."""
    return json.loads((d / "config.json").read_text())


def recorded(**changes) -> Callable[[Path], None]:
    """A crafted config: the model section changed (a key of ``model``, else of the whole
    config) and both checksums recomputed to match, so only the checks of the section's
    contents can refuse it."""

    def damage(d: Path) -> None:
        config = config_of(d)
        for key, value in changes.items():
            (config["model"] if key in config["model"] else config)[key] = value
        section = {k: config[k] for k in ("model", "classes", "feature_mean", "feature_std")}
        weights = d / "model.safetensors"
        meta = {"format": "stabq-model", "config_sha256": _model_digest(section)}
        save_tensors(load_tensors(str(weights)), str(weights), metadata=meta)
        config["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        (d / "config.json").write_text(json.dumps(config))

    return damage


def listing(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones too) with its bytes: what a failure
    must leave as it was."""
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(directory.rglob("*"))
    }


def write(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Save ``x``, ``y`` with the library a user would use for that format."""
    if path.suffix == ".npz":
        np.savez(path, x=x, y=y)
    elif path.suffix == ".pt":
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
    elif path.suffix == ".safetensors":
        save_file({"x": np.ascontiguousarray(x), "y": np.ascontiguousarray(y)}, str(path))
    else:
        df = pd.DataFrame(x, columns=[f"f{j}" for j in range(x.shape[1])]).assign(label=y)
        df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path)
    return path


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """From now until the test ends, every change under ``root`` fails in this process as on
    a read-only filesystem (``OSError`` EROFS): opening for writing, creating, removing,
    renaming, chmod. Reads pass. A call relative to a directory descriptor is refused
    where the descriptor's path cannot be told (no ``/proc``)."""
    root_text = os.path.abspath(root)

    def inside(path: object, dir_fd: int | None = None) -> bool:
        if isinstance(path, int):
            return False
        path = os.fsdecode(path)
        if dir_fd is not None:
            fd_path = f"/proc/self/fd/{dir_fd}"
            if not os.path.exists(fd_path):
                return True
            path = os.path.join(os.readlink(fd_path), path)
        path = os.path.abspath(path)
        return path == root_text or path.startswith(root_text + os.sep)

    def refuse(path: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def guarded(original: Callable, writes: Callable[..., bool] = lambda *a, **k: True) -> Callable:
        def call(path, *args, **kwargs):
            if inside(path, kwargs.get("dir_fd")) and writes(*args, **kwargs):
                refuse(path)
            return original(path, *args, **kwargs)

        return call

    def two_paths(original: Callable) -> Callable:
        def call(src, dst, *args, **kwargs):
            for path, fd in ((src, kwargs.get("src_dir_fd")), (dst, kwargs.get("dst_dir_fd"))):
                if inside(path, fd):
                    refuse(path)
            return original(src, dst, *args, **kwargs)

        return call

    def open_flags(flags: int = os.O_RDONLY, *args, **kwargs) -> bool:
        return bool(flags & _WRITE_FLAGS)

    def open_mode(mode: str = "r", *args, **kwargs) -> bool:
        return any(c in mode for c in "wax+")

    for name in ("mkdir", "unlink", "remove", "rmdir", "chmod"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name)))
    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, two_paths(getattr(os, name)))
    monkeypatch.setattr(os, "open", guarded(os.open, open_flags))
    monkeypatch.setattr(builtins, "open", guarded(builtins.open, open_mode))
    monkeypatch.setattr(io, "open", guarded(io.open, open_mode))


@contextlib.contextmanager
def mounted_tmpfs(target: Path) -> Iterator[Callable[[], None]]:
    """Mount a fresh tmpfs at ``target`` (made if needed) and yield ``seal()``, which
    remounts it read-only; unmounted at the end. Skips the test where this process may
    not mount (not root, no ``mount``, a container without the right)."""
    if getattr(os, "geteuid", lambda: -1)() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    target.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(target)]
    if subprocess.run(command, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")

    def seal() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)

    try:
        yield seal
    finally:
        subprocess.run(["umount", str(target)], check=True)
