"""A distributed run killed by SIGKILL resumes on another number of processes, and back.

``torchrun -m stabq train`` on 2 gloo ranks is killed while rank 0 writes a checkpoint
(held open by the test-only hook ``STABQ_TEST_CHECKPOINT_PAUSE``); ``stabq train --resume``
finishes it in one process. A one-process run killed the same way is finished by
``torchrun ... --resume`` on 2 ranks. Rank 0's checkpoint holds the whole state (the
global batch order does not depend on the number of ranks), so either way the run
keeps the epochs it had and ends with a model that loads and evaluates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from stabq.cli import app
from stabq.saving import load_history
from stabq.training.checkpoint import CHECKPOINT, PAUSE_ENV
from test_cli_resume import epochs_done, wait_for
from test_distributed import SRC, TESTS, TIMEOUT_S, children, torchrun

pytestmark = pytest.mark.outcome  # the verdict depends on how training ends

EPOCHS = 4
RUN = [
    "--data", "synthetic:16", "--quantizer", "vq", "--option", "codebook_size=64",
    "--epochs", str(EPOCHS), "--hidden", "16", "--bottleneck-dim", "8", "--batch-size", "32",
    "--quiet",
]  # fmt: skip


def start(out, nproc: int) -> subprocess.Popen:
    """``stabq train RUN --out out`` on ``nproc`` processes, paused writing checkpoint 2."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "stabq", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", PAUSE_ENV: "2:120"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS)])
    return subprocess.Popen(
        [*cmd, *RUN, "--out", str(out)], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def kill_mid_write(proc: subprocess.Popen, out) -> None:
    """SIGKILL the run (torchrun and its workers) once checkpoint 2 is half written."""

    def half_written() -> bool:
        strays = list(out.glob(f".{CHECKPOINT}.*")) if epochs_done(out) == 1 else []
        return any(p.is_file() and p.stat().st_size > 0 for p in strays)

    wait_for(half_written, proc, "a half-written checkpoint", timeout=TIMEOUT_S)
    for pid in [*children(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert epochs_done(out) == 1  # the previous checkpoint, whole


def checkpointed_history(out) -> list[dict]:
    """The history rows stored in the checkpoint: the epochs done before the kill."""
    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        return json.loads(f.metadata()["state"])["history"]


def check_finished(out, kept: list[dict]) -> None:
    assert not (out / CHECKPOINT).exists()
    history = load_history(out)
    assert len(history) == EPOCHS
    assert history[: len(kept)] == kept  # the epochs done before the kill, as they were
    weights = load_file(out / "model.safetensors")
    assert all(t.isfinite().all() for t in weights.values() if t.is_floating_point())
    result = CliRunner().invoke(app, ["evaluate", str(out), "--data", "synthetic:16", "--json"])
    assert result.exit_code == 0, result.output
    assert '"accuracy"' in result.output


@pytest.mark.parametrize(("killed_on", "resumed_on"), [(2, 1), (1, 2)])
def test_a_killed_run_resumes_on_another_number_of_processes(tmp_path, killed_on, resumed_on):
    out = tmp_path / "run"
    kill_mid_write(start(out, killed_on), out)
    kept = checkpointed_history(out)
    assert len(kept) == 1
    if resumed_on == 1:
        result = CliRunner().invoke(app, ["train", "--resume", str(out), "--quiet"])
        assert result.exit_code == 0, (result.output, result.exception)
    else:
        torchrun("-m", "stabq", "train", "--resume", str(out), "--quiet", cwd=tmp_path)
    check_finished(out, kept)
