"""The GPU check's runs of stabq's command line as a process: ``torchrun ... stabq train``
and ``stabq compare`` on the device. Each gives a row: the command, its exit status, what it
wrote, and the end of its log when it failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE_TIMEOUT_S = 150  # a healthy run takes 10-30 s
COMPARE_TIMEOUT_S = 300  # 3 runs of 2 epochs: well under a minute on a GPU
PORT_RACE = ("Address already in use", "EADDRINUSE", "DistNetworkError", "RendezvousConnection")


def _environment() -> dict[str, str]:
    """This checkout's stabq first on the path."""
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep)}


def start_smoke_run(device: torch.device, data: str, workdir: Path) -> Callable[[], dict]:
    """Start ``torchrun --standalone --nproc_per_node=1 -m stabq train`` for one epoch in the
    background; the call returned waits for it and gives its verdict (exit status and model
    file). A launch that lost its port to another process (--standalone's race) is retried."""
    out, log = workdir / "smoke", workdir / "smoke.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
        "-m", "stabq", "train", "--data", data, "--quantizer", "fsq", "--epochs", "1",
        "--device", str(device), "--out", str(out), "--quiet",
    ]  # fmt: skip
    env = _environment()

    def launch() -> subprocess.Popen:
        with log.open("w") as sink:  # a file, not a pipe: a hung worker could hold a pipe
            return subprocess.Popen(
                cmd, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait(proc: subprocess.Popen) -> int:
        try:
            return proc.wait(timeout=SMOKE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this launch started
            return proc.wait()

    first = launch()

    def result() -> dict:
        code = wait(first)
        if code != 0 and any(sign in log.read_text(errors="replace") for sign in PORT_RACE):
            code = wait(launch())
        written = (out / "model.safetensors").is_file()
        verdict = {"command": " ".join(cmd[1:]), "returncode": code, "model_written": written}
        verdict["passed"] = code == 0 and written
        tail = {} if verdict["passed"] else {"log_tail": log.read_text(errors="replace")[-3000:]}
        return {**verdict, **tail}

    return result


def compare_run(device: torch.device, data: str, workdir: Path) -> dict:
    """``stabq compare`` of none, vq and fsq, 1 seed of 2 epochs, trained on ``device``:
    the model lives there while the test rows stay on the CPU. Passes when it exits 0 and
    writes results.json with a row per method."""
    out, log = workdir / "compare", workdir / "compare.log"
    cmd = [
        sys.executable, "-m", "stabq", "compare", "--data", data, "--methods", "none,vq,fsq",
        "--seeds", "1", "--epochs", "2", "--option", f"device={json.dumps(str(device))}",
        "--quiet", "--out", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    with log.open("w") as sink:
        try:
            code = subprocess.run(
                cmd, cwd=workdir, env=_environment(), stdout=sink, stderr=subprocess.STDOUT,
                timeout=COMPARE_TIMEOUT_S,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            code = -1
    results = out / "results.json"
    rows = json.loads(results.read_text())["rows"] if results.is_file() else []
    row = {"command": " ".join(cmd[1:]), "returncode": code, "methods": len(rows)}
    row.update(seconds=time.perf_counter() - started, passed=code == 0 and len(rows) == 3)
    return row if row["passed"] else {**row, "log_tail": log.read_text(errors="replace")[-3000:]}


__all__ = ["compare_run", "start_smoke_run"]
