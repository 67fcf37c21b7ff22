"""The generated ``tokens`` task (stabq.data.tokens): its class is the order of the marker
roles, so a bag of tokens scores chance and order features score near the label-noise
ceiling; and the arrays are what they say (shapes, ids, padding, balance, determinism).

The margins come from the spread over seeds 0..9 (1,000 test rows each, chance 1/6 = 0.167):
bag-of-tokens logistic regression 0.148..0.190 (sd 0.012, the binomial noise of 1,000 rows),
bag-of-tokens MLP 0.148..0.186 (sd 0.013), order-aware logistic regression 0.894..0.924
(sd 0.009; the ceiling is 1 - LABEL_NOISE * 5/6 = 0.917). No torch here: sklearn only.
"""

from __future__ import annotations

import doctest
import hashlib
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stabq.data import tokens
from stabq.data.tokens import (
    MARKER_IDS,
    MAX_LEN,
    MIN_LEN,
    NUM_CLASSES,
    PAD_ID,
    TOKEN_CLASSES,
    TOKEN_TEST,
    TOKEN_TRAIN,
    VOCAB_SIZE,
    token_arrays,
    token_lengths,
)

CHANCE = 1 / NUM_CLASSES
BAG_MARGIN = 0.06  # about 5 sd of the measured spread of bag models around chance
ORDER_FLOOR = 0.85  # about 6 sd under the measured mean of the order features (0.910)
SEEDS = (0, 1, 2)


def role_of_id() -> np.ndarray:
    """For each token id, the index of the marker role it writes, or -1 (pad, filler)."""
    role = np.full(VOCAB_SIZE, -1)
    for r, ids in enumerate(MARKER_IDS):
        role[list(ids)] = r
    return role


def bag(x: np.ndarray) -> np.ndarray:
    """Token counts: how many times each real id (1..VOCAB_SIZE-1) occurs in each row."""
    counts = np.zeros((len(x), VOCAB_SIZE))
    np.add.at(counts, (np.arange(len(x))[:, None], x), 1)
    return counts[:, 1:]


def positions(x: np.ndarray) -> np.ndarray:
    """``(N, roles)``: the position of each marker role in each row."""
    roles = role_of_id()[x]
    return np.stack([np.argmax(roles == r, axis=1) for r in range(len(MARKER_IDS))], axis=1)


def before(x: np.ndarray) -> np.ndarray:
    """Hand-made order features: for each pair of roles a < b, 1 where a comes first."""
    pos = positions(x)
    pairs = [(a, b) for a in range(len(MARKER_IDS)) for b in range(a + 1, len(MARKER_IDS))]
    return np.stack([pos[:, a] < pos[:, b] for a, b in pairs], axis=1).astype(np.float64)


def score(model, features, seed: int) -> float:
    """Test accuracy of ``model`` fitted on ``features`` of the train part of ``seed``."""
    x, y, x_test, y_test = token_arrays(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features(x), y)
    return model.score(features(x_test), y_test)


@pytest.mark.parametrize("seed", SEEDS)
def test_bag_of_tokens_scores_chance(seed):
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    mlp = MLPClassifier((32,), max_iter=100, random_state=0)
    for model in (linear, mlp):
        assert abs(score(model, bag, seed) - CHANCE) < BAG_MARGIN, model


@pytest.mark.parametrize("seed", SEEDS)
def test_order_features_solve_it(seed):
    accuracy = score(LogisticRegression(max_iter=500), before, seed)
    assert accuracy > ORDER_FLOOR
    assert accuracy - CHANCE > 10 * BAG_MARGIN  # far from anything a bag can reach


def test_each_role_once_so_counts_say_nothing():
    """The reason a bag fails: every row writes each role exactly once, whatever its class,
    and the marker counts are the same in every class."""
    x, y, _, _ = token_arrays(0)
    roles = role_of_id()[x]
    for r in range(len(MARKER_IDS)):
        assert ((roles == r).sum(axis=1) == 1).all()
    markers = (roles >= 0).sum(axis=1)
    assert all((markers[y == c] == len(MARKER_IDS)).all() for c in range(NUM_CLASSES))


def test_shapes_dtypes_and_constants():
    x, y, x_test, y_test = token_arrays(0)
    assert x.shape == (TOKEN_TRAIN, MAX_LEN) and x_test.shape == (TOKEN_TEST, MAX_LEN)
    assert y.shape == (TOKEN_TRAIN,) and y_test.shape == (TOKEN_TEST,)
    assert {a.dtype for a in (x, y, x_test, y_test)} == {np.dtype(np.int64)}
    assert (TOKEN_TRAIN, TOKEN_TEST, MAX_LEN, PAD_ID) == (4000, 1000, 32, 0)
    assert len(TOKEN_CLASSES) == NUM_CLASSES == 6 and len(set(TOKEN_CLASSES)) == 6
    assert sorted(i for ids in MARKER_IDS for i in ids) == list(range(1, tokens.FIRST_FILLER))


@pytest.mark.parametrize("part", [0, 2])
def test_ids_in_range_and_padding_only_after_the_end(part):
    x = token_arrays(0)[part]
    lengths = token_lengths(x)
    inside = np.arange(MAX_LEN)[None, :] < lengths[:, None]
    assert ((x[inside] >= 1) & (x[inside] < VOCAB_SIZE)).all()
    assert (x[~inside] == PAD_ID).all()
    assert lengths.min() >= MIN_LEN and lengths.max() <= MAX_LEN
    assert set(np.unique(lengths)) == set(range(MIN_LEN, MAX_LEN + 1))  # variable lengths


def test_classes_roughly_balanced():
    _, y, _, y_test = token_arrays(0)
    for labels in (y, y_test):
        counts = np.bincount(labels, minlength=NUM_CLASSES)
        assert len(counts) == NUM_CLASSES
        assert (np.abs(counts / (len(labels) / NUM_CLASSES) - 1) < 0.2).all(), counts


def test_label_noise_near_its_rate():
    """The labels that disagree with the order are the redrawn ones: 5/6 of LABEL_NOISE."""
    x, y, _, _ = token_arrays(0)
    first_to_last = np.argsort(positions(x), axis=1)  # the roles in the order they appear
    names = ["".join(tokens.ROLES[r] for r in row) for row in first_to_last]
    clean = np.array([TOKEN_CLASSES.index(name) for name in names])
    disagree = (clean != y).mean()
    assert abs(disagree - tokens.LABEL_NOISE * 5 / 6) < 0.03


def test_deterministic_for_a_seed_and_seeds_differ():
    first, again, other = token_arrays(3), token_arrays(3), token_arrays(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[1], other[1])
    assert token_arrays()[0].tobytes() == token_arrays(0)[0].tobytes()


def test_same_arrays_in_a_fresh_process():
    """No hidden state: another interpreter (another hash seed) makes the same bytes."""
    code = (
        "import hashlib; from stabq.data.tokens import token_arrays; "
        "print(hashlib.sha256(b''.join(a.tobytes() for a in token_arrays(5))).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    here = hashlib.sha256(b"".join(a.tobytes() for a in token_arrays(5))).hexdigest()
    assert out.stdout.strip() == here


def test_global_rng_left_as_found():
    np.random.seed(7)
    state = np.random.get_state()
    token_arrays(1)
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]


def test_token_lengths():
    x = np.array([[5, 7, 0, 0], [3, 4, 5, 6], [0, 0, 0, 0], [9, 0, 9, 0]])
    assert token_lengths(x).tolist() == [2, 4, 0, 1]
    assert token_lengths(x).dtype == np.int64
    assert token_lengths(np.zeros((0, 4), dtype=np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="2-D"):
        token_lengths(np.array([1, 2, 0]))


def test_docstring_examples_run():
    failed, attempted = doctest.testmod(tokens, optionflags=doctest.ELLIPSIS)
    assert attempted >= 4 and failed == 0
