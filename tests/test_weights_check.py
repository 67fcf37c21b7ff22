"""config.json against the weights' safetensors header, checked before any module is built for
real: on the meta device, with no k-means, no tensor read, and the key that explains a
mismatch named with both values."""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch

import stabq
import stabq.saving
from bad_input import recorded
from stabq.errors import ConfigError, ModelFileError
from stabq.model import BottleneckClassifier
from stabq.model.weights_check import check_fits_weights
from stabq.quantizers import codebook
from stabq.quantizers.registry import preset_names
from stabq.saving import save_model

SHAPES = {"mlp": [12], "cnn1d": [2, 12], "cnn2d": [1, 8, 8]}


def saved(directory, *args, **kwargs):
    torch.manual_seed(0)
    model = BottleneckClassifier(*args, **kwargs)
    return save_model(model, directory, classes=[str(i) for i in range(model.num_classes)])


@pytest.mark.parametrize("encoder", list(SHAPES))
def test_every_preset_fits_its_own_weights_on_meta_without_k_means(encoder, tmp_path, monkeypatch):
    def no_kmeans(*args, **kwargs):
        raise AssertionError("k-means ran while checking shapes")

    monkeypatch.setattr(codebook, "kmeans", no_kmeans)
    for name in preset_names():
        d = saved(tmp_path / name, SHAPES[encoder], 3, name, hidden=64, bottleneck_dim=16,
                  encoder=encoder)  # fmt: skip
        config = stabq.saving.read_config(d)
        check_fits_weights(d / "config.json", d / "model.safetensors", config["model"])


def test_a_crafted_size_is_refused_without_building_or_reading_a_tensor(tmp_path, monkeypatch):
    d = saved(tmp_path / "m", 4, 3, "vq", hidden=8, bottleneck_dim=4, codebook_size=16)
    recorded(quantizer_kwargs={"codebook_size": 1_000_000})(d)

    class Refused:
        @staticmethod
        def from_config(config):
            raise AssertionError("a model was built for real")

    def no_read(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(stabq.saving, "BottleneckClassifier", Refused)
    monkeypatch.setattr(stabq.saving, "load_file", no_read)
    with pytest.raises(ModelFileError) as info:
        stabq.load(d)
    assert str(info.value) == (
        f"{d / 'config.json'}: quantizer_kwargs.codebook_size=1000000, but model.safetensors "
        f"was saved with quantizer_kwargs.codebook_size=16 (its quantizer.codebook.embed has "
        f"shape [1, 16, 4], not [1, 1000000, 4])"
    )


def test_of_two_keys_of_the_same_value_the_one_the_weights_explain_is_named(tmp_path):
    # hidden=16 and the crafted bottleneck_dim=16: only bottleneck_dim=8 gives the saved shapes
    d = saved(tmp_path / "m", 4, 3, "fsq", hidden=16, bottleneck_dim=8, levels=[3, 3])
    recorded(bottleneck_dim=16)(d)
    with pytest.raises(ModelFileError) as info:
        stabq.load(d)
    assert str(info.value) == (
        f"{d / 'config.json'}: bottleneck_dim=16, but model.safetensors was saved with "
        f"bottleneck_dim=8 (its projector.6.weight has shape [8, 16], not [16, 16])"
    )


def test_a_size_no_single_key_explains_names_the_tensor_and_both_shapes(tmp_path):
    d = saved(tmp_path / "m", 4, 3, "fsq", hidden=8, bottleneck_dim=4, levels=[3, 3])
    recorded(quantizer_kwargs={"levels": [3, 3, 3]})(d)  # 3 code dimensions where 2 were saved
    with pytest.raises(ModelFileError) as info:
        stabq.load(d)
    assert str(info.value) == (
        f"{d / 'config.json'}: the model it describes has quantizer.project_in.weight of shape "
        f"[3, 4], but model.safetensors holds [2, 4]"
    )


FACTORY = """
from torch import nn


def make(input_shape, out_dim):  # reads a value: cannot be built on the meta device
    layer = nn.Linear(input_shape[-1], out_dim)
    assert float(layer.weight.detach().abs().sum()) >= 0
    return layer
"""


def test_a_factory_that_cannot_be_built_on_meta_still_loads(tmp_path, monkeypatch):
    name = f"valued_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="meta"), torch.device("meta"):
            BottleneckClassifier(4, 3, encoder=f"{name}:make")
        d = saved(tmp_path / "m", 4, 3, "vq", hidden=8, bottleneck_dim=4, codebook_size=16,
                  encoder=f"{name}:make")  # fmt: skip
        x = torch.randn(3, 4)
        assert stabq.load(d).encoder(x).shape == (3, 4)
        recorded(quantizer_kwargs={"codebook_size": 4096})(d)  # the rest is still checked
        with pytest.raises(ModelFileError, match=r"codebook_size=4096, but model\.safetensors"):
            stabq.load(d, trust_encoder=True)
    finally:
        sys.modules.pop(name, None)
