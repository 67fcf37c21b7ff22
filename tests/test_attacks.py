"""The numeric guard under attack, for every preset.

Three attacks: poisoned batches (x 1e8, NaN, Inf; one in the first ten steps),
a learning rate of 1.0 (50x this run's, 300x the default) and features scaled
by 1e4. Such runs are chaotic: a last-bit difference between two processors'
kernels sends them elsewhere, so no test here takes a verdict from one run's
accuracy against a threshold a few points away. Each asserts what must hold on
any processor, kernel path and thread count:

- poisoned batches are left out before they touch the model: the guard skips
  exactly the poisoned steps, and the run ends bitwise as the same run whose
  poisoned batches held other values (so nothing of them reached the model);
- at lr 1.0 the guard fires, and the run either stops with a one-line
  ``TrainingError`` or ends with finite weights well above chance;
- features x 1e4 are the clean run's features once standardised, and the run
  ends with finite weights well above chance;
- no weight, in memory or saved, is ever non-finite.

How close an attacked run ends to its clean run is a figure, not a verdict:
``benchmarks/attacks.py`` measures it (medians over seeds and kernel paths) for
README. The floors below sit far under every figure it measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stabq import BottleneckClassifier, TrainConfig, TrainingError, preset_names, save_model, train
from stabq.data import LabeledData, Standardizer, from_arrays, load_data, train_val_split
from stabq.training.loop import evaluate_model

pytestmark = pytest.mark.outcome  # the verdict depends on how training ends

ROWS, EPOCHS, BATCH, LR = 1200, 12, 64, 2e-2
POISON = {2: "1e8", 40: "nan", 90: "inf", 150: "1e8"}  # global steps (17 an epoch)
OTHER_POISON = dict.fromkeys(POISON, "-inf")  # the same steps, other values
ATTACKS = ("poisoned batches", "lr 1.0", "features x 1e4")
CHANCE = 0.1  # 10 balanced classes
# benchmarks/attacks.py over seeds 0-4 and the default, avx2 and avx512 kernel paths (135
# runs an attack): the lowest accuracy of a run that finished was 0.388 at lr 1.0 (gumbel,
# seed 1), 0.694 with poisoned batches and 0.664 with features x 1e4 (gumbel, seed 2);
# seed 0, which the tests run, never below 0.665. A floor at 3x chance stays clear of all
# of them and far above a wrecked model (one stuck on a class scores 0.1). Every lr 1.0
# run that finished had 2 to 10 guard events; no features x 1e4 run had one.
FLOOR = 3 * CHANCE


@dataclass
class Outcome:
    model: BottleneckClassifier
    accuracy: float
    events: list


def blobs_data() -> tuple[LabeledData, LabeledData]:
    train_set, test_set = load_data("synthetic:16", "train"), load_data("synthetic:16", "test")
    small = from_arrays(train_set.x[:ROWS], train_set.y[:ROWS], classes=train_set.classes)
    return small, test_set


@pytest.fixture(scope="module")
def blobs() -> tuple[LabeledData, LabeledData]:
    return blobs_data()


def poisoner(steps: dict[int, str]):
    """A batch transform that poisons the batches of ``steps`` as each value says."""

    def poison(step: int, x: torch.Tensor, y: torch.Tensor):
        kind = steps.get(step)
        if kind == "1e8":
            x = x * 1e8
        elif kind is not None:
            x = x.clone()
            x[::3, step % x.shape[1]] = float(kind)  # a third of the rows, one feature
        return x, y

    return poison


def run(preset: str, attack: str, blobs, seed: int = 0, poison: dict[int, str] = POISON) -> Outcome:
    """Train ``preset`` under ``attack`` (or ``"clean"``); weights checked finite either way."""
    train_set, test_set = blobs
    scale = 1e4 if attack == "features x 1e4" else 1.0
    if scale != 1.0:
        train_set = from_arrays(train_set.x * scale, train_set.y, classes=train_set.classes)
    torch.manual_seed(seed)
    model = BottleneckClassifier(16, 10, preset, hidden=32, bottleneck_dim=16)
    config = TrainConfig(
        epochs=EPOCHS,
        batch_size=BATCH,
        lr=1.0 if attack == "lr 1.0" else LR,
        seed=seed,
        progress=False,
    )
    transform = poisoner(poison) if attack == "poisoned batches" else None
    try:
        result = train(model, train_set, config=config, batch_transform=transform)
    finally:
        assert_finite(model.state_dict())
    x, y = torch.from_numpy(test_set.x * scale), torch.from_numpy(test_set.y)
    return Outcome(model, evaluate_model(model, x, y)["accuracy"], result.guard_events)


def assert_finite(state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert bad == [], bad


def assert_saved_finite(model: BottleneckClassifier, tmp_path) -> None:
    save_model(model, tmp_path / "model", classes=[str(i) for i in range(10)])
    assert_finite(load_file(tmp_path / "model" / "model.safetensors"))


def assert_one_line(err: TrainingError) -> None:
    assert "\n" not in str(err) and "training" in str(err), str(err)


@pytest.mark.parametrize("preset", preset_names())
def test_poisoned_batches_are_left_out_before_they_touch_the_model(preset, blobs, tmp_path):
    poisoned = run(preset, "poisoned batches", blobs)
    assert [e["step"] for e in poisoned.events] == list(POISON)  # those, and nothing else
    assert all("skipped" in e["reason"] for e in poisoned.events)
    other = run(preset, "poisoned batches", blobs, poison=OTHER_POISON)
    assert [e["step"] for e in other.events] == list(POISON)
    # Same process, same kernels: had any value of a poisoned batch reached the model
    # (a forward pass, a running statistic, a step), the two runs would differ.
    mine, theirs = poisoned.model.state_dict(), other.model.state_dict()
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
    assert poisoned.accuracy > FLOOR, poisoned.accuracy
    assert_saved_finite(poisoned.model, tmp_path)


@pytest.mark.parametrize("preset", preset_names())
def test_at_lr_1_the_guard_fires_and_the_run_ends_well_above_chance_or_stops(
    preset, blobs, tmp_path
):
    try:
        attacked = run(preset, "lr 1.0", blobs)
    except TrainingError as err:  # stopped: said in one line; weights were checked in run()
        assert_one_line(err)
        return
    assert attacked.events, "lr 1.0 went by without one guard event"
    assert all("skipped" not in e["reason"] for e in attacked.events)  # undone, not skipped
    assert attacked.accuracy > FLOOR, (attacked.accuracy, attacked.events[-3:])
    assert_saved_finite(attacked.model, tmp_path)


@pytest.mark.parametrize("preset", preset_names())
def test_features_x_1e4_train_as_the_standardised_clean_features(preset, blobs, tmp_path):
    attacked = run(preset, "features x 1e4", blobs)
    part, _ = train_val_split(blobs[0], TrainConfig().val_fraction, seed=0)  # what train fits
    stats = Standardizer.fit(part.x)
    x = torch.from_numpy(np.ascontiguousarray(part.x))
    clean = (x - torch.from_numpy(stats.mean)) / torch.from_numpy(stats.std)
    scaled = (x * 1e4 - attacked.model.feature_mean) / attacked.model.feature_std
    torch.testing.assert_close(scaled, clean, rtol=1e-5, atol=1e-5)
    assert attacked.events == []  # standardised, they are the clean features: nothing to undo
    assert attacked.accuracy > FLOOR, attacked.accuracy
    assert_saved_finite(attacked.model, tmp_path)


def test_a_clean_run_needs_no_guard_and_clears_the_floor(blobs):
    """The floor means something: a clean run of the plainest preset is far above it, and
    a model that never trained is below it."""
    clean = run("none", "clean", blobs)
    assert clean.events == []
    assert clean.accuracy > 2 * FLOOR
    torch.manual_seed(0)
    untrained = BottleneckClassifier(16, 10, "fsq", hidden=32, bottleneck_dim=16)
    _, test_set = blobs
    x, y = torch.from_numpy(test_set.x), torch.from_numpy(test_set.y)
    assert evaluate_model(untrained, x, y)["accuracy"] < FLOOR
