"""DiscreteBottleneckClassifier: scikit-learn's own estimator checks, then stabq's behaviour."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from stabq.data import load_data
from stabq.errors import ConfigError
from stabq.estimator import DiscreteBottleneckClassifier

pytestmark = pytest.mark.outcome  # the verdict depends on how training ends

# Small and quick, yet past check_classifiers_train's bar (training accuracy > 0.83 on blobs).
SMALL = {
    "epochs": 10,
    "hidden": 32,
    "bottleneck_dim": 8,
    "batch_size": 16,
    "lr": 0.02,
    "dropout": 0.0,
}
RVQ_OPTIONS = {"num_quantizers": 2, "codebook_size": 8}


def small(quantizer: str = "fsq", **kw) -> DiscreteBottleneckClassifier:
    options = {"levels": [5, 5]} if quantizer == "fsq" else RVQ_OPTIONS
    return DiscreteBottleneckClassifier(
        quantizer=quantizer, **{"quantizer_options": options, **SMALL, **kw}
    )


@parametrize_with_checks([small("fsq"), small("rvq")])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def blobs():
    x, y = make_blobs(n_samples=240, centers=4, n_features=6, random_state=0)
    return x, y


@pytest.fixture(scope="module")
def fitted_fsq(blobs):
    return small("fsq", random_state=0).fit(*blobs)


@pytest.fixture(scope="module")
def fitted_rvq(blobs):
    return small("rvq", random_state=0).fit(*blobs)


def test_digits_accuracy_with_default_fsq():
    train, test = load_data("digits", "train"), load_data("digits", "test")
    clf = DiscreteBottleneckClassifier(epochs=8, random_state=0).fit(train.x, train.y)
    assert clf.model_.arch["quantizer"] == "fsq"
    assert len(clf.history_) == 8 and "val_accuracy" in clf.history_[-1]
    assert clf.score(test.x, test.y) > 0.9


@pytest.mark.parametrize("name", ["fsq", "rvq"])
def test_transform_codes_decode_to_the_model_logits(name, blobs, fitted_fsq, fitted_rvq):
    clf = {"fsq": fitted_fsq, "rvq": fitted_rvq}[name]
    x = blobs[0]
    codes = clf.transform(x)
    width = 1 if name == "fsq" else RVQ_OPTIONS["num_quantizers"]
    assert codes.dtype == np.int64 and codes.shape == (len(x), width)
    model = clf.model_.eval()
    indices = torch.from_numpy(codes[:, 0] if name == "fsq" else codes)
    with torch.no_grad():
        decoded = model.head(model.quantizer.indices_to_codes(indices))
        logits, out = model(torch.from_numpy(x).float())
    assert torch.equal(out.indices.reshape(len(x), -1), torch.from_numpy(codes))
    torch.testing.assert_close(decoded, logits)
    ids = np.asarray(clf.predict_proba(x)).argmax(axis=1)
    np.testing.assert_array_equal(ids, logits.argmax(dim=1).numpy())


def test_transform_without_codes_is_a_clear_error(blobs):
    clf = DiscreteBottleneckClassifier(
        quantizer="none", **{**SMALL, "epochs": 2}, random_state=0
    ).fit(*blobs)
    assert clf.predict(blobs[0]).shape == (len(blobs[0]),)
    with pytest.raises(ConfigError, match="no discrete codes"):
        clf.transform(blobs[0])


def test_string_labels_round_trip(blobs):
    x, y = blobs
    names = np.array(["ant", "bee", "cat", "dog"], dtype=object)[y]
    clf = small(random_state=0).fit(x, names)
    assert list(clf.classes_) == ["ant", "bee", "cat", "dog"]
    pred = clf.predict(x)
    assert set(pred) <= set(clf.classes_)
    assert np.mean(pred == names) > 0.9
    assert clf.model_.classes == ["ant", "bee", "cat", "dog"]


def test_params_round_trip_through_set_params_and_clone():
    clf = small("rvq", random_state=3)
    params = clf.get_params()
    assert params["quantizer"] == "rvq" and params["quantizer_options"] is RVQ_OPTIONS
    assert clone(clf).get_params() == params
    other = DiscreteBottleneckClassifier().set_params(**params)
    assert other.get_params() == params
    assert other.set_params(epochs=4).epochs == 4


def test_same_random_state_gives_identical_predictions(blobs, fitted_fsq):
    again = small("fsq", random_state=0).fit(*blobs)
    np.testing.assert_array_equal(again.predict_proba(blobs[0]), fitted_fsq.predict_proba(blobs[0]))
    other = small("fsq", random_state=1).fit(*blobs)
    assert not np.array_equal(other.predict_proba(blobs[0]), fitted_fsq.predict_proba(blobs[0]))


def test_fit_leaves_the_callers_torch_rng_alone(blobs):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    small("fsq", epochs=1, random_state=0).fit(*blobs)
    assert torch.equal(torch.rand(3), expected)


def test_predict_proba_is_a_distribution(blobs, fitted_fsq):
    proba = fitted_fsq.predict_proba(blobs[0])
    assert proba.dtype == np.float64 and proba.shape == (len(blobs[0]), 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_predict_before_fit_raises_not_fitted():
    with pytest.raises(NotFittedError):
        DiscreteBottleneckClassifier().predict(np.zeros((2, 3)))


def test_wrong_feature_count_names_the_expected_count(blobs, fitted_fsq):
    with pytest.raises(ValueError, match="expecting 6 features"):
        fitted_fsq.predict(np.zeros((2, 5)))


def test_single_class_is_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        small().fit(np.zeros((5, 2)), np.ones(5))


def test_tiny_inputs_still_fit():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [9.0, 0.0]])
    clf = small(random_state=0).fit(x, ["a", "a", "b", "b", "c"])  # class c has one row
    assert clf.predict(x).shape == (5,)


def test_bad_options_surface_as_config_errors(blobs):
    with pytest.raises(ConfigError, match="quantizer_options"):
        small(quantizer_options=[5, 5]).fit(*blobs)
    with pytest.raises(ConfigError, match="not a preset"):
        DiscreteBottleneckClassifier(quantizer="nope").fit(*blobs)


def test_pickle_keeps_predictions(blobs, fitted_rvq):
    again = pickle.loads(pickle.dumps(fitted_rvq))
    np.testing.assert_array_equal(again.transform(blobs[0]), fitted_rvq.transform(blobs[0]))
