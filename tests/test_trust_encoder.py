"""A model directory whose encoder is a user's factory imports it when loaded: only with
``trust_encoder=True`` / ``--trust-encoder``, or for what this very process saved or ran.

The factory module of these tests creates a marker file when it is imported: a refusal
must leave no marker (nothing was imported), and trust must import it and load.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import stabq
import stabq.model.trust
import stabq.saving
from bad_input import assert_user_error, cli, recorded
from stabq.errors import UntrustedEncoderError
from stabq.model import BottleneckClassifier
from stabq.saving import save_model
from stabq.training.checkpoint import CHECKPOINT

CLASSES = [str(i) for i in range(10)]
DATA = "synthetic:4"
SMALL = ["--epochs", "1", "--hidden", "8", "--bottleneck-dim", "4", "--quiet"]
FACTORY = """
from pathlib import Path
from torch import nn

{side_effect}

def make(input_shape, out_dim):
    return nn.Sequential(nn.Linear(input_shape[-1], 6), nn.Tanh(), nn.Linear(6, out_dim))
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """Two modules on sys.path with the same factory ``make``: ``plain`` and ``marked``, whose
    import creates ``tmp_path / "MARKER"``. Returns ``(plain, marked, marker)``."""
    tag = uuid.uuid4().hex[:8]
    plain, marked, marker = f"plain_{tag}", f"marked_{tag}", tmp_path / "MARKER"
    (tmp_path / f"{plain}.py").write_text(textwrap.dedent(FACTORY.format(side_effect="")))
    effect = f"Path({str(marker)!r}).write_text('imported')"
    (tmp_path / f"{marked}.py").write_text(textwrap.dedent(FACTORY.format(side_effect=effect)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield plain, marked, marker
    for name in (plain, marked):
        sys.modules.pop(name, None)


@pytest.fixture
def forget(monkeypatch):
    """Empty this process's memory of what it saved and ran: as another process would be."""

    def clear() -> None:
        monkeypatch.setattr(stabq.model.trust, "_SAVED", set())
        monkeypatch.setattr(stabq.model.trust, "_RUNS", set())

    return clear


def saved_with(encoder: str, directory: Path, quantizer: str = "fsq") -> Path:
    torch.manual_seed(0)
    options = {"levels": [3, 3]} if quantizer == "fsq" else {}
    model = BottleneckClassifier(
        4, 10, quantizer, hidden=8, bottleneck_dim=4, encoder=encoder, **options
    )
    return save_model(model, directory, classes=CLASSES)


def test_python_load_refuses_a_factory_before_importing_it_and_trust_loads_it(factories, tmp_path):
    plain, marked, marker = factories
    d = saved_with(f"{plain}:make", tmp_path / "m")
    recorded(encoder=f"{marked}:make")(d)  # as a model from elsewhere would name its module
    with pytest.raises(UntrustedEncoderError) as info:
        stabq.load(d)
    assert str(info.value) == (
        f"{d}: its encoder is {marked}:make, a factory from outside stabq that loading it "
        f"would import and run; if you trust where it came from, pass trust_encoder=True"
    )
    assert isinstance(info.value, stabq.ModelFileError)
    assert not marker.exists() and marked not in sys.modules
    model = stabq.load(d, trust_encoder=True)
    assert marker.read_text() == "imported" and model.classes == CLASSES
    x = torch.randn(5, 4)
    assert torch.equal(model(x)[0], stabq.load(d, trust_encoder=True)(x)[0])


@pytest.mark.parametrize("command", ["evaluate", "encode"])
def test_the_cli_refuses_a_factory_without_trust_encoder_and_loads_it_with(
    factories, command, tmp_path
):
    plain, marked, marker = factories
    d = saved_with(f"{plain}:make", tmp_path / "m")
    recorded(encoder=f"{marked}:make")(d)
    extra = ["--out", tmp_path / "codes.npy"] if command == "encode" else []
    result = cli(command, d, "--data", DATA, *extra)
    assert_user_error(
        result, f"stabq: error: {d}: its encoder is {marked}:make,", "pass --trust-encoder"
    )
    assert not marker.exists() and not (tmp_path / "codes.npy").exists()
    result = cli(command, d, "--data", DATA, *extra, "--trust-encoder")
    assert result.exit_code == 0, (result.output, result.exception)
    assert marker.exists()
    if command == "encode":
        assert np.load(tmp_path / "codes.npy").shape == (1000, 1)


def test_what_this_process_saved_loads_without_trust_and_nothing_else_does(
    factories, forget, tmp_path
):
    plain, _, _ = factories
    d = saved_with(f"{plain}:make", tmp_path / "m")
    stabq.load(d)  # saved by this process: exactly this config.json in this directory
    assert cli("evaluate", d, "--data", DATA).exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    with pytest.raises(UntrustedEncoderError):
        stabq.load(copy)  # the same bytes elsewhere: not what this process wrote there
    config = d / "config.json"
    original = config.read_bytes()
    config.write_text(json.dumps(json.loads(original)))  # the same JSON, other bytes
    with pytest.raises(UntrustedEncoderError):
        stabq.load(d)
    config.write_bytes(original)
    stabq.load(d)
    forget()  # another process: nothing on disk makes it trusted
    with pytest.raises(UntrustedEncoderError):
        stabq.load(d)
    assert stabq.load(saved_with("mlp", tmp_path / "mlp")).classes == CLASSES  # built in


def test_init_from_a_model_with_a_factory_needs_trust_encoder(factories, forget, tmp_path):
    plain, _, _ = factories
    start = saved_with(f"{plain}:make", tmp_path / "cont", quantizer="none")
    forget()
    run = ["train", "--data", DATA, "--encoder", f"{plain}:make", *SMALL]
    result = cli(*run, "--init-from", start, "--out", tmp_path / "fsq")
    assert_user_error(result, f"{start}: its encoder is {plain}:make", "pass --trust-encoder")
    assert not (tmp_path / "fsq").exists()
    result = cli(*run, "--init-from", start, "--out", tmp_path / "fsq", "--trust-encoder")
    assert result.exit_code == 0, (result.output, result.exception)
    stabq.load(tmp_path / "fsq")  # saved by this process


def unfinished_run(encoder: str, out: Path, monkeypatch) -> None:
    """A ``stabq train`` run whose final save failed: its checkpoint is left in ``out``."""

    def full(*args, **kwargs):
        raise stabq.ModelFileError(f"{out}: cannot write the model (No space left on device)")

    with monkeypatch.context() as patch:
        patch.setattr(stabq.saving, "save_model", full)
        result = cli("train", "--data", DATA, "--encoder", encoder, *SMALL, "--out", out)
    assert_user_error(result, "No space left on device")
    assert (out / CHECKPOINT).is_file()


def rename_encoder(out: Path, encoder: str) -> None:
    """Rewrite the checkpoint's recorded --encoder (as a checkpoint from elsewhere could)."""
    path = out / CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state = json.loads(meta["state"])
    state["run"]["cli"]["encoder"] = state["fingerprint"]["model"]["encoder"] = encoder
    save_file(tensors, str(path), metadata={**meta, "state": json.dumps(state)})


def test_resume_of_a_run_with_a_factory_needs_trust_unless_this_process_started_it(
    factories, forget, tmp_path, monkeypatch
):
    plain, marked, marker = factories
    out = tmp_path / "run"
    unfinished_run(f"{plain}:make", out, monkeypatch)
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    result = cli("train", "--resume", out, "--quiet")  # started by this process
    assert result.exit_code == 0, (result.output, result.exception)
    forget()
    shutil.rmtree(out)
    shutil.copytree(kept, out)
    rename_encoder(out, f"{marked}:make")
    result = cli("train", "--resume", out, "--quiet")
    assert_user_error(
        result,
        f"stabq: error: --resume {out}: its encoder is {marked}:make, a factory from outside "
        f"stabq that resuming it would import and run; if you trust where it came from, pass "
        f"--trust-encoder",
    )
    assert not marker.exists() and marked not in sys.modules
    result = cli("train", "--resume", out, "--quiet", "--trust-encoder")
    assert result.exit_code == 0, (result.output, result.exception)
    assert marker.exists() and not (out / CHECKPOINT).exists()
    assert stabq.saving.read_config(out)["model"]["encoder"] == f"{marked}:make"
