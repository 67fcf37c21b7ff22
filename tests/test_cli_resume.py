"""`stabq train` killed by SIGKILL, then `stabq train --resume DIR`: bitwise the run never killed.

Real processes, killed at random points: after a random number of checkpoints
plus a random delay, and once in the middle of writing a checkpoint (held open
there by the test-only hook ``STABQ_TEST_CHECKPOINT_PAUSE``). Each kill's
points are in the assertion message, to replay a failure.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import stabq
from stabq.cli import app, main
from stabq.saving import load_history
from stabq.training.checkpoint import CHECKPOINT, PAUSE_ENV

pytestmark = pytest.mark.outcome  # the verdict depends on how training ends

SRC = Path(stabq.__file__).resolve().parents[1]
EPOCHS = 6
RUN = [
    "--data", "synthetic:16", "--quantizer", "vq", "--option", "codebook_size=64",
    "--two-stage", "--epochs", str(EPOCHS), "--hidden", "16", "--bottleneck-dim", "8",
    "--batch-size", "32", "--quiet",
]  # fmt: skip
runner = CliRunner()


def start(*args: str, pause: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = pause
    return subprocess.Popen(
        [sys.executable, "-m", "stabq", "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out, err)


_EPOCHS_READ: dict[tuple, int] = {}  # (file, inode, mtime, size) -> its epoch


def epochs_done(out: Path) -> int:
    """Epochs of the checkpoint in ``out``; -1 when there is none yet. The file is read again
    only once it changed (a new checkpoint is a new file moved in): the tests poll this every
    5 ms while a run trains, and reading each time cost seconds of this process's CPU."""
    try:
        info = (out / CHECKPOINT).stat()
        key = (str(out), info.st_ino, info.st_mtime_ns, info.st_size)
        if key not in _EPOCHS_READ:
            with safe_open(str(out / CHECKPOINT), framework="pt") as f:
                _EPOCHS_READ[key] = json.loads(f.metadata()["state"])["epoch"]
        return _EPOCHS_READ[key]
    except FileNotFoundError:
        return -1


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, (f"exited before {what}", proc.communicate())
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.005)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def assert_same_run(out: Path, reference: Path) -> None:
    """Bitwise the same weights and buffers; the same history but for wall-clock seconds."""
    assert not (out / CHECKPOINT).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    assert [k for k in want if not got[k].equal(want[k])] == []

    def rows(d):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in load_history(d)]

    assert rows(out) == rows(reference)
    assert len(rows(out)) == EPOCHS


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, started as the killed ones are: a process with the same
    environment (kernel path, one thread), so a bitwise comparison is sound whatever the
    tests' own process runs with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(start(*RUN, "--out", out))
    return out


def test_a_run_killed_mid_write_then_at_a_random_point_finishes_as_if_never_killed(
    tmp_path, reference
):
    rng = random.Random()
    torn, last = rng.randint(1, 3), rng.randint(4, EPOCHS - 1)
    epoch_seconds = min(row["seconds"] for row in load_history(reference))
    delay = rng.uniform(0.0, 0.5 * epoch_seconds)  # lands within the next epoch
    points = f"killed writing checkpoint {torn}, then after checkpoint {last} + {delay:.3f} s"
    out = tmp_path / "run"
    proc = start(*RUN, "--out", out, pause=f"{torn}:120")  # holds that write open halfway

    def half_written() -> bool:  # the new temporary file, once the previous checkpoint is in
        strays = list(out.glob(f".{CHECKPOINT}.*")) if epochs_done(out) == torn - 1 else []
        return any(p.is_file() and p.stat().st_size > 0 for p in strays)

    wait_for(half_written, proc, "a half-written checkpoint")
    kill(proc)
    assert len(list(out.glob(f".{CHECKPOINT}.*"))) == 1, points  # the torn temporary file
    assert epochs_done(out) == torn - 1, points  # and the previous checkpoint, whole
    result = runner.invoke(app, ["evaluate", str(out), "--data", "synthetic:16"])
    assert result.exit_code == 2
    assert "has not finished" in result.stderr and f"--resume {out}" in result.stderr

    proc = start("--resume", out, "--quiet")
    wait_for(lambda: epochs_done(out) >= last, proc, f"checkpoint {last}")
    time.sleep(delay)
    kill(proc)
    assert last <= epochs_done(out) < EPOCHS, points
    assert list(out.glob(f".{CHECKPOINT}.*")) == [], points  # the torn file was cleared

    finish(start("--resume", out))
    assert_same_run(out, reference)


# --- refusals, each one line and exit 2 (in-process) --------------------------------------------


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stabq: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory) -> Path:
    """A run whose disk filled up as it saved the model: its last checkpoint is left."""
    import stabq.saving

    out = tmp_path_factory.mktemp("unfinished") / "run"

    def full(*args, **kwargs):
        raise stabq.ModelFileError(f"{out}: cannot write the model (No space left on device)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stabq.saving, "save_model", full)
        result = runner.invoke(app, ["train", *RUN, "--epochs", "2", "--out", str(out)])
    one_line_error(result, "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT]
    assert epochs_done(out) == 2
    return out


@pytest.fixture
def unfinished(unfinished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(unfinished_run, out)
    return out


def test_resume_after_a_failed_final_save_only_saves_the_model(unfinished):
    result = runner.invoke(app, ["train", "--resume", str(unfinished), "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert [row["epoch"] for row in load_history(unfinished)] == [1, 2]
    assert not (unfinished / CHECKPOINT).exists()
    stabq.load(unfinished)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--epochs", "3"], ["--epochs 3 conflicts with the interrupted run's 2"]),
        (["--quantizer", "fsq"], ["--quantizer 'fsq' conflicts", "'vq'"]),
        (["--data", "digits"], ["--data 'digits' conflicts"]),
        (["--out", "elsewhere"], ["--out elsewhere", "leave --out out"]),
    ],
)
def test_resume_with_conflicting_options_is_refused(unfinished, extra, fragments):
    before = (unfinished / CHECKPOINT).read_bytes()
    result = runner.invoke(app, ["train", "--resume", str(unfinished), *extra])
    one_line_error(result, f"--resume {unfinished}", *fragments)
    assert (unfinished / CHECKPOINT).read_bytes() == before


def test_resume_with_the_same_options_typed_again_is_accepted(unfinished):
    result = runner.invoke(
        app, ["train", "--resume", str(unfinished), "--epochs", "2", "--quantizer", "vq", "--quiet"]
    )
    assert result.exit_code == 0, (result.output, result.exception)


def test_a_fresh_run_into_an_unfinished_one_is_refused(unfinished):
    before = (unfinished / CHECKPOINT).read_bytes()
    result = runner.invoke(app, ["train", *RUN, "--out", str(unfinished)])
    one_line_error(result, "unfinished run (epoch 2 done)", f"--resume {unfinished}")
    assert (unfinished / CHECKPOINT).read_bytes() == before


def test_resume_of_a_finished_run_is_refused(tmp_path, reference):
    done = tmp_path / "done"
    shutil.copytree(reference, done)
    one_line_error(
        runner.invoke(app, ["train", "--resume", str(done)]), "has finished", "nothing to resume"
    )


@pytest.mark.parametrize("make", [False, True])
def test_resume_of_a_directory_without_a_checkpoint_is_refused(tmp_path, make):
    target = tmp_path / "empty"
    if make:
        target.mkdir()
    result = runner.invoke(app, ["train", "--resume", str(target)])
    if make:
        one_line_error(result, f"--resume {target}", "no checkpoint there")
    else:
        one_line_error(result, f"--resume {target}", "no such directory")


@pytest.mark.parametrize(("given", "missing"), [("--out", "--data"), ("--data", "--out")])
def test_train_without_data_or_out_is_a_usage_error(tmp_path, monkeypatch, capsys, given, missing):
    monkeypatch.setattr("sys.argv", ["stabq", "train", given, str(tmp_path / "x")])
    with pytest.raises(SystemExit) as info:
        main()
    lines = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"stabq: error: Missing option '{missing}'"), lines
    assert list(tmp_path.iterdir()) == []


# --- a real full disk and a real read-only directory (tmpfs; needs the right to mount) ---------


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(options)`` gives a fresh tmpfs directory; skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        target = tmp_path / f"fs{len(mounted)}"
        target.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)]
        if shutil.which("mount") is None or subprocess.run(command, capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=True)


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_once_there_is_room(tmpfs, reference):
    disk = tmpfs("size=120k")  # room for one checkpoint and a half: a later write fails
    out = disk / "run"
    proc = start(*RUN, "--out", out)  # a process, as the reference ran: bitwise comparable
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stabq: error: "), lines
    assert str(out) in lines[0] and "No space left on device" in lines[0], lines
    assert [p.name for p in out.iterdir()] == [CHECKPOINT]  # no torn file, no partial model
    assert 0 <= epochs_done(out) <= EPOCHS
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # room made
    finish(start("--resume", out))
    assert_same_run(out, reference)


def test_a_read_only_output_directory_is_one_line_and_writes_nothing(tmpfs):
    disk = tmpfs("ro,size=1m")
    result = runner.invoke(app, ["train", *RUN, "--out", str(disk / "run")])
    one_line_error(result, str(disk / "run"), "Read-only file system")
    assert list(disk.iterdir()) == []
