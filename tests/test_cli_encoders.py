"""The command line with encoders: a user's factory through train, a fresh process's evaluate
and encode, its one-line failures; uint8 images; compare with --encoder and --test-data."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import stabq
from bad_input import assert_user_error, cli, listing
from stabq.saving import read_config

pytestmark = pytest.mark.outcome  # the verdict depends on how training ends

SRC = Path(stabq.__file__).resolve().parents[1]
SMALL = ["--epochs", "2", "--hidden", "32", "--bottleneck-dim", "16", "--batch-size", "64"]
FACTORY = """
from torch import nn


class Conv(nn.Module):
    def __init__(self, length, out_dim, width={width}):
        super().__init__()
        self.conv = nn.Conv1d(1, width, 5, padding=2)
        self.out = nn.Linear(width * length, out_dim)

    def forward(self, x):
        return self.out(self.conv(x.unsqueeze(1)).relu().flatten(1))


def make(input_shape, out_dim):
    return Conv(input_shape[-1], out_dim)


def too_wide(input_shape, out_dim):
    return Conv(input_shape[-1], out_dim + 3)
"""
USER_MODULES = ("my_encoders", "nowhere")


def stabq_process(*args: object, cwd: Path, pythonpath: Path | None = None):
    """``python -m stabq ARGS`` in a fresh process, the user's module importable from
    ``pythonpath`` (as when it sits in the working directory of their project)."""
    paths = [str(SRC)] + ([str(pythonpath)] if pythonpath else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [sys.executable, "-m", "stabq", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )  # fmt: skip


@contextlib.contextmanager
def in_project(cwd: Path, pythonpath: Path | None = None):
    """``stabq`` in this process as if started in ``cwd`` with ``pythonpath`` on its path; the
    user's modules it imports are forgotten afterwards, so that no other test sees them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        if pythonpath is not None:
            patch.syspath_prepend(str(pythonpath))
        for name in USER_MODULES:
            patch.delitem(sys.modules, name, raising=False)
        try:
            yield
        finally:
            for name in USER_MODULES:
                sys.modules.pop(name, None)
            importlib.invalidate_caches()


def one_line(proc, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stabq: error: "), lines
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's project directory holding their encoder module, ``my_encoders.py``."""
    root = tmp_path_factory.mktemp("project")
    (root / "my_encoders.py").write_text(textwrap.dedent(FACTORY.format(width=8)))
    return root


@pytest.fixture(scope="module")
def trained(project) -> Path:
    """Trained through the command line in this process (its module found in the working
    directory); the tests load it in fresh processes, which did not train it."""
    out = project / "model"
    with in_project(project):
        result = cli(
            "train", "--data", "mnist1d", "--encoder", "my_encoders:make", "--quantizer", "fsq",
            *SMALL, "--quiet", "--out", out,
        )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def test_a_user_encoder_trains_through_the_cli_and_loads_in_a_fresh_process(project, trained):
    config = read_config(trained)
    assert config["model"]["encoder"] == "my_encoders:make"
    assert config["model"]["input_shape"] == [40]
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    evaluate = ("evaluate", trained, "--data", "mnist1d", "--json")
    proc = stabq_process(*evaluate, cwd=elsewhere, pythonpath=project)  # not this process's
    one_line(proc, f"{trained}: its encoder is my_encoders:make", "pass --trust-encoder")
    proc = stabq_process(*evaluate, "--trust-encoder", cwd=elsewhere, pythonpath=project)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["rows"] == 1000 and 0.0 <= figures["accuracy"] <= 1.0
    codes = elsewhere / "codes.npy"
    proc = stabq_process(
        "encode", trained, "--data", "mnist1d", "--out", codes, "--trust-encoder",
        cwd=elsewhere, pythonpath=project,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert np.load(codes).shape == (1000, 1)


# The refusals below run in this process (``import stabq`` costs about 3 s a process): what
# they check is the message, not how a process starts.
def test_a_factory_that_cannot_be_imported_at_load_is_one_line(project, trained):
    elsewhere = project / "no-path"
    elsewhere.mkdir(exist_ok=True)
    with in_project(elsewhere):
        result = cli("evaluate", trained, "--data", "mnist1d", "--trust-encoder")
    assert_user_error(result, str(trained), "cannot import 'my_encoders' (ModuleNotFoundError")


def test_a_factory_that_no_longer_fits_the_weights_is_one_line(project, trained, tmp_path):
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "my_encoders.py").write_text(textwrap.dedent(FACTORY.format(width=4)))
    with in_project(tmp_path, pythonpath=changed):
        result = cli("evaluate", trained, "--data", "mnist1d", "--trust-encoder")
    assert_user_error(
        result, str(trained), "the encoder that my_encoders:make builds no longer fits"
    )


@pytest.mark.parametrize(
    "reference, fragments",
    [
        ("nowhere:make", ("encoder 'nowhere:make': cannot import 'nowhere'",)),
        ("my_encoders:too_wide", ("maps inputs of shape (N, 40) to (N, 19)", "takes (N, 16)")),
    ],
)
def test_a_missing_or_wrong_shape_factory_stops_train_in_one_line(project, reference, fragments):
    out = project / f"refused-{reference.replace(':', '-')}"
    with in_project(project):
        result = cli("train", "--data", "mnist1d", "--encoder", reference, *SMALL, "--out", out)
    assert_user_error(result, *fragments)
    assert not out.exists()


def test_uint8_images_go_through_train_evaluate_and_encode(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = (rng.integers(0, 60, (120, 1, 6, 6)) + 60 * y[:, None, None, None]).astype(np.uint8)
    data = tmp_path / "images.npz"
    np.savez(data, x=x, y=y)
    out = tmp_path / "model"
    result = cli("train", "--data", data, "--encoder", "cnn2d", *SMALL, "--quiet", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    model = read_config(out)["model"]
    assert (model["encoder"], model["input_shape"]) == ("cnn2d", [1, 6, 6])
    result = cli("evaluate", out, "--data", data, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["rows"] == 120
    result = cli("encode", out, "--data", data, "--out", tmp_path / "codes.npy")
    assert result.exit_code == 0 and np.load(tmp_path / "codes.npy").shape == (120, 1)
    before = listing(tmp_path)
    result = cli("train", "--data", data, *SMALL, "--out", tmp_path / "mlp")  # the default MLP
    assert_user_error(result, f"{data}: inputs of shape (N, 1, 6, 6): encoder 'mlp' takes")
    assert listing(tmp_path) == before


def test_compare_takes_an_encoder_and_the_users_test_split(tmp_path):
    test = load_test_file(tmp_path)
    out = tmp_path / "report"
    result = cli(
        "compare", "--data", "mnist1d", "--test-data", test, "--encoder", "cnn1d",
        "--methods", "none,fsq", "--seeds", "1", "--epochs", "1", "--quiet", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["encoder"] == "cnn1d"
    assert all(r["test_rows"] == 200 for r in saved["runs"])
    assert "encoder cnn1d" in (out / "report.md").read_text().splitlines()[0]


def load_test_file(tmp_path: Path) -> Path:
    """200 rows of mnist1d's test part, as a user's own test file."""
    test = stabq.data.load_data("mnist1d", "test")
    path = tmp_path / "test.npz"
    np.savez(path, x=test.x[:200], y=test.y[:200])
    return path


def test_init_from_a_continuous_cnn_starts_stage_two_from_its_weights(tmp_path):
    seq = ["--data", "mnist1d", "--encoder", "cnn1d", *SMALL, "--quiet"]
    result = cli("train", *seq, "--quantizer", "none", "--out", tmp_path / "cont")
    assert result.exit_code == 0, (result.output, result.exception)
    result = cli(
        "train", *seq, "--init-from", tmp_path / "cont", "--freeze-projector",
        "--out", tmp_path / "fsq",
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    history = stabq.saving.load_history(tmp_path / "fsq")
    assert [row["stage"] for row in history] == [2, 2]
    start, frozen = stabq.load(tmp_path / "cont").encoder, stabq.load(tmp_path / "fsq").encoder
    assert start.conv[0].weight.shape == (8, 1, 5)  # hidden 32: 32 // 8 channels, at least 8
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), frozen.parameters(),
                                                 strict=True))  # fmt: skip
    result = cli("train", "--data", "mnist1d", *SMALL, "--init-from", tmp_path / "cont",
                 "--out", tmp_path / "mlp")  # fmt: skip
    assert_user_error(result, "the projector of the model to start from has shapes")
    assert not (tmp_path / "mlp").exists()


def test_the_installed_command_finds_a_factory_in_the_working_directory(project, tmp_path):
    """``stabq`` (the console script, whose path lacks the working directory) trains with a
    module that sits in the directory it runs in, as ``python -m stabq`` does."""
    command = Path(sys.executable).parent / "stabq"
    if not command.is_file():
        pytest.skip("no stabq console script beside this interpreter")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [str(command), "train", "--data", "mnist1d", "--encoder", "my_encoders:make",
         "--quantizer", "fsq", *SMALL, "--quiet", "--out", str(tmp_path / "m")],
        capture_output=True, text=True, cwd=project, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_config(tmp_path / "m")["model"]["encoder"] == "my_encoders:make"
