"""Model directories: exact round trips, atomic replacement, refusals of altered files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stabq
import stabq.files
import stabq.saving
from stabq import BottleneckClassifier, ModelFileError, StabqError
from stabq.saving import load, load_history, read_config, save_model

INPUT_DIM, NUM_CLASSES = 6, 3
CLASSES = ["cat", "dog", "eel"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Small versions of every kind of bottleneck: FSQ, VQ (EMA codebook), residual VQ,
# product quantization, Gumbel-Softmax and the continuous pass-through.
SMALL = {
    "fsq": {"levels": [5, 5]},
    "vq": {"codebook_size": 16},
    "rvq": {"num_quantizers": 2, "codebook_size": 16},
    "pq": {"num_subspaces": 2, "bits": 4},
    "gumbel": {"codebook_size": 16},
    "none": {},
}

HISTORY = [
    {"epoch": 1, "train_loss": 2.5, "val_accuracy": 0.25, "usage": 0.5, "perplexity": 3.0},
    {"epoch": 2, "train_loss": 1.5, "val_accuracy": 0.5, "usage": 0.75, "perplexity": 4.5},
]


def make_model(quantizer: str = "fsq", seed: int = 0) -> BottleneckClassifier:
    """A small model whose buffers (feature stats, EMA codebooks) are not their initial values."""
    torch.manual_seed(seed)
    model = BottleneckClassifier(
        INPUT_DIM, NUM_CLASSES, quantizer=quantizer, hidden=16, bottleneck_dim=8,
        **SMALL[quantizer],
    )  # fmt: skip
    model.set_feature_stats(torch.randn(INPUT_DIM), torch.rand(INPUT_DIM) + 0.5)
    model.train()
    model(torch.randn(64, INPUT_DIM) * 2 + 1)  # k-means init, EMA updates, ...
    model.eval()
    return model


def probe(seed: int = 123) -> torch.Tensor:
    return torch.randn(50, INPUT_DIM, generator=torch.Generator().manual_seed(seed)) * 2


def logits(model: BottleneckClassifier) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(probe())[0]


def hidden_entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def saved(tmp_path) -> tuple[BottleneckClassifier, Path]:
    """An FSQ model saved (without history) to ``tmp_path / "model"``."""
    model = make_model("fsq")
    return model, save_model(model, tmp_path / "model", classes=CLASSES)


def rewrite_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if key in config["model"]:
            config["model"][key] = value
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


# --- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer", list(SMALL))
def test_load_rebuilds_the_model_exactly(tmp_path, quantizer):
    model = make_model(quantizer)
    directory = save_model(model, tmp_path / "m", classes=CLASSES)
    assert directory == tmp_path / "m"
    loaded = load(directory)

    assert not loaded.training
    assert loaded.classes == CLASSES
    assert loaded.config() == model.config()
    assert loaded.arch["quantizer"] == quantizer
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key, value in state.items():
        assert torch.equal(value, loaded_state[key]), key
    with torch.no_grad():
        want, out = model(probe())
        got, loaded_out = loaded(probe())
    assert torch.equal(got, want)
    assert torch.equal(loaded_out.indices, out.indices)
    assert torch.equal(loaded_out.quantized, out.quantized)


def test_saved_buffers_are_the_trained_ones_not_the_initial_ones(tmp_path):
    # The round trip above would pass trivially if neither side held trained state.
    model = make_model("vq")
    fresh = BottleneckClassifier(
        INPUT_DIM, NUM_CLASSES, quantizer="vq", hidden=16, bottleneck_dim=8, **SMALL["vq"]
    )
    loaded = load(save_model(model, tmp_path / "m", classes=CLASSES))
    assert not torch.equal(loaded.feature_mean, fresh.feature_mean)
    assert torch.equal(loaded.feature_mean, model.feature_mean)
    assert torch.equal(loaded.feature_std, model.feature_std)
    assert not torch.equal(logits(loaded), logits(fresh))


def test_directory_contents(tmp_path):
    model = make_model("rvq")
    train_config = {"epochs": 2, "lr": 0.01}
    directory = save_model(
        model, tmp_path / "m", classes=CLASSES, history=HISTORY, train_config=train_config
    )
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json", "metrics.jsonl", "model.safetensors", "training.png",
    ]  # fmt: skip

    config = json.loads((directory / "config.json").read_text())
    assert config["format"] == "stabq-model"
    assert config["format_version"] == 1  # an MLP model: readable by every stabq so far
    assert config["stabq_version"] == stabq.__version__
    assert config["classes"] == CLASSES
    assert config["feature_mean"] == model.feature_mean.tolist()
    assert config["feature_std"] == model.feature_std.tolist()
    assert config["model"] == model.config()
    assert config["model"]["quantizer_kwargs"] == SMALL["rvq"]
    assert config["train_config"] == train_config
    weights = (directory / "model.safetensors").read_bytes()
    assert config["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert read_config(directory) == config

    lines = (directory / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == HISTORY
    assert load_history(directory) == HISTORY

    png = (directory / "training.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000


def test_without_history_there_are_no_metrics_or_plot(saved):
    _, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    assert load_history(directory) == []
    assert read_config(directory)["train_config"] == {}


def test_weights_are_safetensors_and_nothing_is_a_pickle(tmp_path):
    model = make_model("pq")
    directory = save_model(model, tmp_path / "m", classes=CLASSES, history=HISTORY)
    tensors = load_file(str(directory / "model.safetensors"))
    assert tensors.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(tensors[key], value), key
    for path in directory.iterdir():
        head = path.read_bytes()[:2]
        assert not head.startswith(b"\x80"), f"{path.name} looks like a pickle"
        assert not head.startswith(b"PK"), f"{path.name} looks like a torch.save zip"


def test_load_never_unpickles(saved, monkeypatch):
    model, directory = saved

    def refuse(*args, **kwargs):
        raise AssertionError("stabq.load unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert torch.equal(logits(load(directory)), logits(model))


def test_a_pickle_in_place_of_the_weights_is_refused_unopened(saved, tmp_path):
    # Even with a matching checksum in config.json, a pickle is never unpickled.
    _, directory = saved
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    weights = directory / "model.safetensors"
    weights.write_bytes(pickle.dumps(Payload()))
    rewrite_config(directory, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    with pytest.raises(ModelFileError, match="cannot rebuild the model") as info:
        load(directory)
    assert str(directory) in str(info.value)
    assert not marker.exists()


# --- atomic replacement ------------------------------------------------------------------------


def _crash(*args, **kwargs):
    raise RuntimeError("simulated crash")


@pytest.mark.parametrize(
    ("module", "where"), [(stabq.saving, "plot_history"), (stabq.files, "swap_into_place")]
)
def test_a_crashed_save_keeps_the_previous_model(tmp_path, monkeypatch, module, where):
    first, second = make_model("fsq", seed=1), make_model("fsq", seed=2)
    assert not torch.equal(logits(first), logits(second))
    target = save_model(first, tmp_path / "m", classes=CLASSES, history=HISTORY)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    monkeypatch.setattr(module, where, _crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_model(second, target, classes=["x", "y", "z"], history=HISTORY)
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert torch.equal(logits(load(target)), logits(first))
    assert load(target).classes == CLASSES
    assert hidden_entries(tmp_path) == []


def test_a_crashed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(stabq.saving, "plot_history", _crash)
    with pytest.raises(RuntimeError):
        save_model(make_model("fsq"), tmp_path / "m", classes=CLASSES, history=HISTORY)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_into_place_keeps_the_previous_model(tmp_path, monkeypatch):
    # The swap renames the old directory aside, then the new one into place. If the
    # second rename fails, the old model must come back under the target name.
    first, second = make_model("fsq", seed=1), make_model("fsq", seed=2)
    target = save_model(first, tmp_path / "m", classes=CLASSES)
    rename = os.rename

    def failing_rename(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".m.tmp-"):
            raise OSError(errno.EIO, "simulated I/O error")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(ModelFileError, match="cannot write the model"):
        save_model(second, target, classes=CLASSES)
    monkeypatch.undo()

    assert torch.equal(logits(load(target)), logits(first))
    assert hidden_entries(tmp_path) == []


def test_a_successful_save_replaces_the_previous_model(tmp_path):
    first, second = make_model("fsq", seed=1), make_model("gumbel", seed=2)
    target = save_model(first, tmp_path / "m", classes=CLASSES, history=HISTORY)
    save_model(second, target, classes=["x", "y", "z"])

    loaded = load(target)
    assert loaded.arch["quantizer"] == "gumbel"
    assert loaded.classes == ["x", "y", "z"]
    assert torch.equal(logits(loaded), logits(second))
    # Nothing of the first model survives: it had history, the second has none.
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_wrong_number_of_class_names_is_refused_before_writing(tmp_path):
    with pytest.raises(StabqError, match="2 class names for a model of 3 classes"):
        save_model(make_model("fsq"), tmp_path / "m", classes=["a", "b"])
    assert list(tmp_path.iterdir()) == []


# --- refusals ----------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    for call in (load, read_config):
        with pytest.raises(ModelFileError, match="no such model directory") as info:
            call(missing)
        assert str(missing) in str(info.value)
        assert isinstance(info.value, StabqError)


def test_missing_config(saved):
    _, directory = saved
    (directory / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"config\.json is missing") as info:
        load(directory)
    assert str(directory) in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe"])
def test_config_that_is_not_json(saved, text):
    _, directory = saved
    path = directory / "config.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelFileError, match="unreadable") as info:
        load(directory)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("config", [[1, 2], {"format": "something-else"}])
def test_config_that_is_not_a_stabq_config(saved, config):
    _, directory = saved
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="not a stabq model config"):
        load(directory)


@pytest.mark.parametrize(
    "change",
    [
        {"classes": ["cat", "dog", "emu"]},
        {"hidden": 32},
        {"dropout": 0.5},
        {"quantizer_kwargs": {"levels": [5, 5, 5]}},
        {"feature_mean": [0.0] * INPUT_DIM},
    ],
    ids=lambda change: next(iter(change)),
)
def test_altered_config_is_refused(saved, change):
    _, directory = saved
    rewrite_config(directory, **change)
    with pytest.raises(ModelFileError, match=r"altered \(does not match the weights\)") as info:
        load(directory)
    assert str(directory / "config.json") in str(info.value)


@pytest.mark.parametrize("where", [0, 20, -1], ids=["header-length", "header", "data"])
def test_altered_weights_are_refused(saved, where):
    _, directory = saved
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="altered or corrupted") as info:
        load(directory)
    assert str(path) in str(info.value)


def test_weights_of_another_model_are_refused_even_with_a_fixed_checksum(saved, tmp_path):
    _, directory = saved
    other = save_model(make_model("fsq", seed=9), tmp_path / "other", classes=CLASSES)
    weights = directory / "model.safetensors"
    shutil.copyfile(other / "model.safetensors", weights)
    rewrite_config(directory, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    # Same architecture, so only the weights' record of the config can tell.
    with pytest.raises(ModelFileError, match="altered"):
        load(directory)


def test_missing_weights(saved):
    _, directory = saved
    (directory / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"model\.safetensors is missing") as info:
        load(directory)
    assert str(directory) in str(info.value)


def test_newer_format_asks_to_upgrade(saved):
    _, directory = saved
    # The format version is outside the checksummed model section: the version check fires.
    rewrite_config(directory, format_version=stabq.saving.FORMAT_VERSION + 1, stabq_version="9.0")
    for call in (load, read_config):
        with pytest.raises(ModelFileError, match="upgrade stabq") as info:
            call(directory)
        message = str(info.value)
        assert str(directory / "config.json") in message
        assert "9.0" in message and f"format {stabq.saving.FORMAT_VERSION + 1}" in message


# --- where a save cannot go --------------------------------------------------------------------


def test_save_onto_a_regular_file_is_refused(tmp_path):
    target = tmp_path / "m"
    target.write_text("not a directory")
    with pytest.raises(ModelFileError, match="not a directory") as info:
        save_model(make_model("fsq"), target, classes=CLASSES)
    assert str(target) in str(info.value)
    assert target.read_text() == "not a directory"
    assert hidden_entries(tmp_path) == []


def test_save_below_a_regular_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ModelFileError, match="which exists and is not a directory") as info:
        save_model(make_model("fsq"), blocker / "m", classes=CLASSES)
    assert str(blocker / "m") in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_save_into_a_read_only_directory_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("permissions are not enforced for this user (root?)")
        with pytest.raises(ModelFileError, match="cannot write the model") as info:
            save_model(make_model("fsq"), parent / "m", classes=CLASSES, history=HISTORY)
        assert str(parent / "m") in str(info.value)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)
