"""The claim users act on: on mnist1d, with default settings, every stable quantizer
classifies within 2 points of the continuous classifier trained the same way."""

from __future__ import annotations

import pytest
import torch

from stabq import BottleneckClassifier, TrainConfig, train
from stabq.data import load_data
from stabq.training.loop import evaluate_model

STABLE = ["fsq", "rvq", "vq", "gumbel", "pq"]


@pytest.fixture(scope="module")
def accuracies():
    """Test accuracy of each preset after default training (seed 0; conftest: one thread)."""
    train_set, test_set = load_data("mnist1d", "train"), load_data("mnist1d", "test")
    tx, ty = torch.from_numpy(test_set.x), torch.from_numpy(test_set.y)
    found = {}
    for name in ["none", *STABLE]:
        torch.manual_seed(0)
        model = BottleneckClassifier(train_set.num_features, train_set.num_classes, name)
        train(model, train_set, config=TrainConfig(progress=False))
        found[name] = evaluate_model(model, tx, ty)["accuracy"]
    return found


def test_the_continuous_reference_learns_mnist1d(accuracies):
    assert accuracies["none"] > 0.65  # an MLP on mnist1d; chance is 0.10


@pytest.mark.parametrize("name", STABLE)
def test_quantized_within_two_points_of_continuous(accuracies, name):
    assert accuracies[name] >= accuracies["none"] - 0.02, accuracies
