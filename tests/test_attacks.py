"""The numeric guard under attack, for every preset.

Poisoned batches (x 1e8, NaN, Inf; one in the first ten steps), a learning
rate of 1.0 (50x this run's, 300x the default) and features scaled by 1e4:
each run either ends within 5 points of the same preset's clean run or stops
with a one-line TrainingError, and no weight of the model, in memory or
saved, is ever non-finite. Two pairs fall short, marked as strict expected
failures with their figures: at lr 1.0 the guard's rate cuts leave FSQ-plain
and Gumbel under-trained (finite weights, no error).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from stabq import BottleneckClassifier, TrainConfig, TrainingError, preset_names, save_model, train
from stabq.data import LabeledData, from_arrays, load_data
from stabq.training.loop import evaluate_model

ROWS, EPOCHS, BATCH, LR = 1200, 12, 64, 2e-2
POISON = {2: "1e8", 40: "nan", 90: "inf", 150: "1e8"}  # global steps (17 an epoch)
ATTACKS = ("poisoned batches", "lr 1.0", "features x 1e4")
SHORT = {  # measured: clean -> attacked accuracy
    ("fsq-plain", "lr 1.0"): "78.1% -> 68.4%",
    ("gumbel", "lr 1.0"): "82.3% -> 66.4%",
    # 84.9% with the running-residual RVQ; 80.1% once each layer sees z - sum(codes) again
    ("rvq", "lr 1.0"): "85.3% -> 80.1%",
}
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def blobs() -> tuple[LabeledData, LabeledData]:
    train_set, test_set = load_data("synthetic:16", "train"), load_data("synthetic:16", "test")
    small = from_arrays(train_set.x[:ROWS], train_set.y[:ROWS], classes=train_set.classes)
    return small, test_set


def poison(step: int, x: torch.Tensor, y: torch.Tensor):
    kind = POISON.get(step)
    if kind == "1e8":
        x = x * 1e8
    elif kind is not None:
        x = x.clone()
        x[::3, step % x.shape[1]] = float(kind)  # a third of the rows, one feature
    return x, y


def run(preset: str, attack: str, blobs) -> tuple[BottleneckClassifier, float, list]:
    train_set, test_set = blobs
    scale = 1e4 if attack == "features x 1e4" else 1.0
    if scale != 1.0:
        train_set = from_arrays(train_set.x * scale, train_set.y, classes=train_set.classes)
    torch.manual_seed(0)
    model = BottleneckClassifier(16, 10, preset, hidden=32, bottleneck_dim=16)
    config = TrainConfig(
        epochs=EPOCHS, batch_size=BATCH, lr=1.0 if attack == "lr 1.0" else LR, progress=False
    )
    transform = poison if attack == "poisoned batches" else None
    try:
        result = train(model, train_set, config=config, batch_transform=transform)
    finally:
        assert_finite(model.state_dict())
    x, y = torch.from_numpy(test_set.x * scale), torch.from_numpy(test_set.y)
    return model, evaluate_model(model, x, y)["accuracy"], result.guard_events


def assert_finite(state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert bad == [], bad


_clean: dict[str, float] = {}


def clean_accuracy(preset: str, blobs) -> float:
    if preset not in _clean:
        _, _clean[preset], events = run(preset, "clean", blobs)
        assert events == []
    return _clean[preset]


@pytest.mark.parametrize(
    ("preset", "attack"),
    [
        pytest.param(
            preset, attack,
            marks=[pytest.mark.xfail(
                strict=True, reason=f"under-trained at lr 1.0: {SHORT[preset, attack]}"
            )] if (preset, attack) in SHORT else [],
        )
        for preset in preset_names()
        for attack in ATTACKS
    ],
)  # fmt: skip
def test_under_attack_a_preset_trains_as_well_as_clean_or_stops_clearly(
    preset, attack, blobs, tmp_path
):
    clean = clean_accuracy(preset, blobs)
    assert clean > 0.5, clean  # a clean run worth comparing with
    try:
        model, accuracy, events = run(preset, attack, blobs)
    except TrainingError as err:  # stopped: said in one line; weights were checked in run()
        assert "\n" not in str(err) and "training" in str(err)
        return
    assert accuracy >= clean - TOLERANCE, (preset, attack, accuracy, clean)
    if attack == "poisoned batches":  # each left out before it touched the model
        assert [e["step"] for e in events] == list(POISON)
        assert all("skipped" in e["reason"] for e in events)
    save_model(model, tmp_path / "model", classes=[str(i) for i in range(10)])
    assert_finite(load_file(tmp_path / "model" / "model.safetensors"))
