"""Helpers shared by the bad-input batteries (test_bad_data.py, test_bad_models.py).

``assert_user_error`` is the contract of a refused command: exit status 2, one
stderr line ``stabq: error: ...`` holding every fragment, no traceback.
``Payload`` is a pickle whose ``__reduce__`` creates a marker file when it is
unpickled: a loader that never unpickles leaves no marker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import save_file
from typer.testing import CliRunner

from stabq.cli import app

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
