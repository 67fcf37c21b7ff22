"""Encoders: shapes, per-channel standardisation, a user's factory or module, and their errors."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stabq
from stabq.compare import compare
from stabq.data import Standardizer, from_arrays, load_data
from stabq.encoders import build_encoder, check_input_shape, stats_shape
from stabq.errors import ConfigError, ShapeError
from stabq.estimator import DiscreteBottleneckClassifier
from stabq.model import BottleneckClassifier
from stabq.saving import load, save_model

pytestmark = pytest.mark.outcome  # the verdict depends on how training ends

FAST = stabq.TrainConfig(epochs=2, batch_size=64, progress=False)


@settings(max_examples=40, deadline=None)
@given(
    encoder=st.sampled_from(["mlp", "cnn1d", "cnn2d"]),
    sizes=st.lists(st.integers(1, 12), min_size=3, max_size=3),
    channels=st.booleans(),
    rows=st.integers(1, 5),
    out=st.integers(1, 9),
)
def test_each_builtin_maps_its_inputs_to_the_bottleneck(encoder, sizes, channels, rows, out):
    rank = {"mlp": 1, "cnn1d": 1, "cnn2d": 2}[encoder] + (channels and encoder != "mlp")
    shape = tuple(sizes[:rank])
    module = build_encoder(encoder, shape, out, hidden=16, dropout=0.0)
    assert module(torch.randn(rows, *shape)).shape == (rows, out)


@pytest.mark.parametrize(
    "encoder, shape, stats",
    [
        ("mlp", (40,), (40,)),
        ("cnn1d", (40,), (1,)),
        ("cnn1d", (3, 40), (3, 1)),
        ("cnn2d", (8, 8), (1, 1)),
        ("cnn2d", (3, 8, 8), (3, 1, 1)),
        ("pkg.mod:make", (40,), (40,)),
        ("pkg.mod:make", (3, 8, 8), (3, 1, 1)),
    ],
)
def test_statistics_are_per_feature_for_rows_and_per_channel_otherwise(encoder, shape, stats):
    assert stats_shape(encoder, shape) == stats


@pytest.mark.parametrize(
    "encoder, shape, message",
    [
        ("mlp", (1, 8, 8), "inputs of shape (N, 1, 8, 8): encoder 'mlp' takes (N, D): choose"),
        ("cnn1d", (1, 8, 8), "encoder 'cnn1d' takes (N, L) or (N, C, L): choose --encoder cnn2d"),
        ("cnn2d", (40,), "encoder 'cnn2d' takes (N, H, W) or (N, C, H, W)"),
    ],
)
def test_a_shape_the_encoder_cannot_take_names_both_shapes(encoder, shape, message):
    with pytest.raises(ShapeError) as info:
        check_input_shape(encoder, shape, "data.npz")
    assert str(info.value).startswith("data.npz: ") and message in str(info.value)


def test_cnn_standardisation_is_per_channel_with_the_statistics_saved(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2, 10)).astype(np.float32) * [[3.0], [0.5]] + [[10.0], [-2.0]]
    data = from_arrays(x, np.arange(64) % 4)
    torch.manual_seed(0)
    model = BottleneckClassifier(data.input_shape, 4, "fsq", encoder="cnn1d", levels=[3, 3])
    stabq.train(model, data, config=FAST)
    part, _ = stabq.data.train_val_split(data, FAST.val_fraction, 0)
    want = Standardizer.fit(part.x, (2, 1))
    assert model.feature_mean.shape == (2, 1)
    np.testing.assert_array_equal(model.feature_mean.numpy(), want.mean)
    np.testing.assert_array_equal(model.feature_std.numpy(), want.std)
    np.testing.assert_allclose(want.mean.ravel(), x.mean(axis=(0, 2)), rtol=0.1)
    back = load(save_model(model, tmp_path / "m", classes=["0", "1", "2", "3"]))
    assert back.arch["encoder"] == "cnn1d" and back.input_shape == (2, 10)
    assert torch.equal(back.feature_std, model.feature_std)
    xb = torch.from_numpy(x[:8])
    assert torch.equal(back(xb)[0], model.eval()(xb)[0])


def test_digits_images_are_the_digits_rows_as_8x8():
    rows, images = load_data("digits", "test"), load_data("digits:images", "test")
    assert images.input_shape == (1, 8, 8) and rows.input_shape == (64,)
    assert np.array_equal(images.x.reshape(len(images), 64), rows.x)
    assert np.array_equal(images.y, rows.y)


def test_uint8_images_are_scaled_to_the_unit_interval():
    x = np.arange(4 * 9, dtype=np.uint8).reshape(4, 1, 3, 3) * 7
    data = from_arrays(x, [0, 1, 0, 1])
    assert data.x.dtype == np.float32 and data.x.max() <= 1.0
    np.testing.assert_allclose(data.x * 255, x, rtol=1e-6)


# --- a user's own encoder: a factory by reference, or a module instance -------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``user_encoders`` on sys.path with a good factory and two bad ones."""
    (tmp_path / "user_encoders.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def gru_like(input_shape, out_dim):
                return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], out_dim), nn.Tanh())

            def wrong_width(input_shape, out_dim):
                return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], out_dim + 1))

            def not_a_module(input_shape, out_dim):
                return "a string"

            def raises(input_shape, out_dim):
                raise ValueError("no such layer")

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_encoders"
    sys.modules.pop("user_encoders", None)


def test_a_factory_encoder_trains_saves_and_loads_by_reference(user_module, tmp_path):
    train_set = load_data("synthetic:16", "train")
    torch.manual_seed(0)
    model = BottleneckClassifier(16, 10, "fsq", encoder=f"{user_module}:gru_like")
    assert isinstance(model.encoder[1], nn.Linear)
    stabq.train(model, train_set, config=FAST)
    directory = save_model(model, tmp_path / "m", classes=train_set.classes)
    config = stabq.saving.read_config(directory)
    assert config["model"]["encoder"] == "user_encoders:gru_like"
    assert config["format_version"] == 2
    back = load(directory)
    x = torch.from_numpy(load_data("synthetic:16", "test").x[:32])
    assert torch.equal(back(x)[0], model.eval()(x)[0])


@pytest.mark.parametrize(
    "reference, error, message",
    [
        ("nowhere_at_all:make", ConfigError, "cannot import 'nowhere_at_all' (ModuleNotFound"),
        ("user_encoders:missing", ConfigError, "user_encoders has no callable 'missing'"),
        ("user_encoders:NOT_CALLABLE", ConfigError, "has no callable 'NOT_CALLABLE'"),
        ("user_encoders:not_a_module", ConfigError, "returned str, expected an nn.Module"),
        ("user_encoders:raises", ConfigError, "raised ValueError when called with input_shape"),
        (
            "user_encoders:wrong_width",
            ShapeError,
            "maps inputs of shape (N, 16) to (N, 129); the bottleneck takes (N, 128)",
        ),
        ("not a reference", ConfigError, "encoder='not a reference': allowed is mlp, cnn1d"),
    ],
)
def test_a_bad_factory_is_one_line_naming_it(user_module, reference, error, message):
    with pytest.raises(error) as info:
        BottleneckClassifier(16, 10, "fsq", encoder=reference)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 128))

    def forward(self, x):
        return self.net(x)


def test_a_module_instance_trains_and_compares_but_saving_asks_for_a_factory(tmp_path):
    torch.manual_seed(0)
    model = BottleneckClassifier(16, 10, "fsq", encoder=TinyEncoder())
    stabq.train(model, load_data("synthetic:16", "train"), config=FAST)
    with pytest.raises(ConfigError, match=r"module instance \(TinyEncoder\).*factory") as info:
        save_model(model, tmp_path / "m", classes=[str(i) for i in range(10)])
    assert "\n" not in str(info.value) and not (tmp_path / "m").exists()
    instance = TinyEncoder()
    before = {k: v.clone() for k, v in instance.state_dict().items()}
    result = compare("synthetic:16", ["none", "fsq"], seeds=2, epochs=1, encoder=instance)
    assert [r["method"] for r in result.records] == ["none", "none", "fsq", "fsq"]
    assert result.settings["encoder"] == "instance:TinyEncoder"
    assert all(torch.equal(v, before[k]) for k, v in instance.state_dict().items())  # copied
    accs = {(r["method"], r["seed"]): r["test_accuracy"] for r in result.records}
    assert accs["none", 0] != accs["none", 1]  # each seed drew its own weights


def test_the_estimator_takes_an_encoder():
    train, test = load_data("digits:images", "train"), load_data("digits:images", "test")
    clf = DiscreteBottleneckClassifier(encoder="cnn2d", epochs=10, hidden=128, random_state=0)
    clf.fit(train.x, train.y)
    assert clf.model_.arch["encoder"] == "cnn2d" and clf.model_.input_shape == (1, 8, 8)
    assert clf.predict(test.x).shape == (len(test),) and clf.transform(test.x).shape[0] == len(test)
    # 10 classes: measured 0.950-0.961 over random_state 0-4 on the default and avx512 paths
    assert clf.score(test.x, test.y) > 0.8


def test_a_factory_in_the_working_directory_is_found_as_python_m_would(tmp_path, monkeypatch):
    """The ``stabq`` command's own path lacks the working directory that ``python -m stabq``
    has; a factory there is found all the same, and the search path is left as it was."""
    (tmp_path / "here_nets.py").write_text(
        "from torch import nn\n\ndef make(input_shape, out_dim):\n"
        "    return nn.Linear(input_shape[-1], out_dim)\n"
    )
    monkeypatch.chdir(tmp_path)
    path = [p for p in sys.path if p not in ("", str(tmp_path))]
    monkeypatch.setattr(sys, "path", path)
    monkeypatch.delitem(sys.modules, "here_nets", raising=False)
    encoder = build_encoder("here_nets:make", (8,), 4, hidden=16, dropout=0.0)
    assert encoder(torch.zeros(2, 8)).shape == (2, 4)
    assert sys.path == path
