"""compare as a user runs it: on their own arrays or Dataset, under their own recipe, with
one seed, on a model that lives on another device than the test rows, and with progress a
log can show."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from stabq import BottleneckClassifier, TrainConfig, compare
from stabq.compare import METHODS
from stabq.report import format_table
from stabq.training.batches import as_labeled_data
from stabq.training.evaluation import evaluate_model, forward_chunks, model_device

runs = importlib.import_module("stabq.compare.runs")  # one run of a comparison


def blobs(n: int = 240, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, dim)).astype(np.float32) + 4.0 * np.eye(3, dim)[y].astype(np.float32)
    return x, y


# --- the model's device, not the rows' ---------------------------------------------------------


def spy_devices(model: torch.nn.Module) -> list[torch.device]:
    seen: list[torch.device] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].device))
    return seen


def test_the_chunked_pass_moves_rows_to_the_models_device():
    """A model on another device (here 'meta', which has no data) gets each chunk there;
    the rows stay where they were and the model's training mode comes back."""
    model = BottleneckClassifier(input_dim=6, num_classes=3, quantizer="vq").to("meta")
    seen = spy_devices(model)
    x = torch.randn(10, 6)
    outs = list(forward_chunks(model, x, batch_size=4))
    assert [logits.shape[0] for logits, _ in outs] == [4, 4, 2]
    assert seen == [torch.device("meta")] * 3 and x.device.type == "cpu"
    assert all(out.indices.device.type == "meta" for _, out in outs)
    assert model.training and model_device(model).type == "meta"


def test_evaluation_and_compare_hand_the_model_rows_on_its_device(monkeypatch):
    """What a GPU would meet: compare trains on the model's device and evaluates rows kept
    on the CPU. With the model on 'meta' the figures cannot be read, but the rows must have
    reached the model there (before, they reached it on the CPU: a device mismatch)."""
    model = BottleneckClassifier(input_dim=6, num_classes=3, quantizer="vq").to("meta")
    seen = spy_devices(model)
    with pytest.raises(RuntimeError, match="meta"):  # meta tensors hold no numbers to read
        evaluate_model(model, torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
    assert seen and set(seen) == {torch.device("meta")}

    seen.clear()
    monkeypatch.setattr(runs, "BottleneckClassifier", lambda *a, **k: model)

    def train_elsewhere(m, *args, **kwargs):
        raise runs.TrainingError("trained on another device")

    monkeypatch.setattr(runs, "train", train_elsewhere)
    x, y = blobs(40)
    data = as_labeled_data((x, y))
    config = TrainConfig(epochs=1, progress=False)
    with pytest.raises(RuntimeError, match="meta"):
        runs.run_one(METHODS["vq"], 0, data, data, config)
    assert seen and set(seen) == {torch.device("meta")}


# --- the user's data and recipe ----------------------------------------------------------------


def test_compare_takes_arrays_a_dataset_and_the_users_recipe():
    x, y = blobs()
    options = {"lr": 5e-3, "batch_size": 32, "optimizer": "sgd", "weight_decay": 0.0}
    run = {"methods": "none,fsq", "seeds": 1, "epochs": 2, "progress": False, "options": options}
    arrays = compare((x, y), **run)
    assert arrays.settings["lr"] == 5e-3 and arrays.settings["batch_size"] == 32
    assert arrays.settings["optimizer"] == "sgd" and arrays.settings["weight_decay"] == 0.0
    assert [r["method"] for r in arrays.rows] == ["none", "fsq"]
    assert all(r["test_rows"] == 48 for r in arrays.records)  # a stratified 20% of 240
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    same = compare(dataset, **run)  # the same rows, read through a Dataset
    for a, b in zip(arrays.records, same.records, strict=True):
        assert a["test_accuracy"] == b["test_accuracy"] and a["code_counts"] == b["code_counts"]
    tx, ty = blobs(60, seed=1)
    held = compare((x, y), test_data=(tx, ty), **run)
    assert all(r["test_rows"] == 60 for r in held.records)


def test_one_seed_claims_no_spread():
    x, y = blobs()
    result = compare((x, y), methods="none,fsq", seeds=1, epochs=1, progress=False)
    assert all(r["accuracy_sd"] is None for r in result.rows)
    header, *body = format_table(result.rows).splitlines()[:3]
    assert header.split()[:5] == ["method", "test", "acc", "%", "±"]
    assert all(line.split()[2] == "-" for line in body)  # method, accuracy, then ± sd
    assert "1 methods" not in result.verdict


# --- progress a log can show -------------------------------------------------------------------


def test_compare_prints_a_line_a_run_when_its_output_is_a_file(tmp_path):
    """Redirected to a file, bars would show nothing for minutes: one line a run instead."""
    log = tmp_path / "log"
    with log.open("w") as stream:
        done = subprocess.run(
            [sys.executable, "-m", "stabq", "compare", "--data", "synthetic:8", "--methods",
             "none,fsq", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path / "rep")],
            stdout=stream, stderr=subprocess.STDOUT, timeout=300,
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text
    lines = text.splitlines()
    assert lines[0] == "compare: 2 runs; a line as each ends"
    assert lines[1].startswith("compare: run 1/2 none seed 0: test acc ")
    assert lines[2].startswith("compare: run 2/2 fsq seed 0: test acc ")
    assert "\r" not in text  # no bar redrawn in place
    payload = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert payload["settings"]["seeds"] == 1
