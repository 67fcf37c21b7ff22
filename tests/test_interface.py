"""Every preset honours the shared contract: shapes, dtypes, pass-through, decoding, errors."""

from __future__ import annotations

import math

import pytest
import torch

import stabq
from stabq import ConfigError, QuantizerOutput, ShapeError, StabqError, build_quantizer

QUANTIZED = [name for name in stabq.preset_names() if name != "none"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_presets_are_the_ones_the_design_names():
    assert set(stabq.preset_names()) == {
        "fsq",
        "fsq-plain",
        "fsp",
        "ifsq",
        "rvq",
        "vq-ema",
        "vq",
        "diveq",
        "rvq-diveq",
        "gumbel",
        "gumbel-reinmax",
        "pq",
        "simvq",
        "rfsq",
        "lfq",
        "bsq",
        "none",
    }


@pytest.mark.parametrize("name", stabq.preset_names())
@pytest.mark.parametrize("shape", [(64, 128), (4, 16, 128)])
def test_every_preset_takes_2d_and_3d_input(name, shape):
    q = build_quantizer(name, 128)
    out = q(torch.randn(*shape))
    assert isinstance(out, QuantizerOutput)
    quantized, indices, loss = out
    assert quantized.shape == shape
    assert indices.dtype == torch.int64
    assert indices.shape == shape[:-1] + ((q.num_codebooks,) if q.num_codebooks > 1 else ())
    assert loss.dim() == 0 and torch.isfinite(loss)
    if name != "none":
        assert indices.min() >= 0 and indices.max() < q.codebook_size


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_preset_takes_half_precision_input(name, dtype):
    q = build_quantizer(name, 64)
    x = torch.randn(32, 64)
    q(x)  # first training batch (k-means init) in float32
    q.eval()
    quantized, indices, loss = q(x.to(dtype))
    assert quantized.dtype == dtype and torch.isfinite(quantized).all()
    assert torch.isfinite(loss)
    assert torch.equal(indices, q(x.to(dtype).float()).indices)


@pytest.mark.parametrize("name", QUANTIZED)
def test_eval_output_decodes_from_its_indices(name):
    q = build_quantizer(name, 64)
    x = torch.randn(3, 50, 64)
    q(x)
    q.eval()
    quantized, indices, _ = q(x)
    torch.testing.assert_close(q.indices_to_codes(indices), quantized, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", stabq.preset_names())
def test_quantization_disabled_passes_input_through(name):
    q = build_quantizer(name, 64)
    q.quantization_enabled = False
    x = torch.randn(5, 7, 64, requires_grad=True)
    quantized, indices, loss = q(x)
    assert quantized is x
    assert torch.equal(indices, torch.full_like(indices, -1))
    assert indices.shape[:2] == (5, 7) and loss.item() == 0.0


@pytest.mark.parametrize("name", QUANTIZED)
def test_gradients_reach_the_input(name):
    q = build_quantizer(name, 64)
    x = torch.randn(40, 64, requires_grad=True)
    quantized, _, loss = q(x)
    (quantized.square().sum() + loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", QUANTIZED)
def test_dim_mismatch_is_a_shape_error_naming_both_sizes(name):
    q = build_quantizer(name, 64)
    with pytest.raises(ShapeError, match="last dimension 32, expected dim=64"):
        q(torch.randn(8, 32))
    with pytest.raises(ShapeError, match="floating-point"):
        q(torch.ones(8, 64, dtype=torch.long))


def test_unknown_preset_lists_the_allowed_names():
    with pytest.raises(ConfigError, match=r"quantizer='vqq' is not a preset; allowed: fsq, "):
        build_quantizer("vqq", 64)


def test_unknown_override_names_the_option_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"no option 'codebook_size'; allowed: levels, pre_norm"):
        build_quantizer("fsq", 64, codebook_size=8)


def test_overrides_replace_preset_options():
    q = build_quantizer("rvq", 64, num_quantizers=2, codebook_size=16)
    assert q.num_codebooks == 2 and q.codebook_size == 16
    vq = build_quantizer("vq", 128)
    assert vq.cosine and vq.codebook.kmeans_init and vq.codebook.dead_code_threshold == 2
    assert vq.codebook.dim == 32 and vq.codebook_size == 512
    assert build_quantizer("vq", 16).codebook.dim == 16  # no projection up to 32 dims
    base = build_quantizer("vq-ema", 128)
    assert base.codebook.decay == 0.99 and not base.codebook.kmeans_init and not base.cosine
    assert build_quantizer("fsq", 128).pre_norm is not None
    assert build_quantizer("fsq-plain", 128).pre_norm is None


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: stabq.VectorQuantizer(64, 0), "codebook_size=0"),
        (lambda: stabq.ResidualVQ(64, codebook_size=-3), "codebook_size=-3"),
        (lambda: stabq.GumbelQuantizer(64, codebook_size=0), "codebook_size=0"),
        (lambda: stabq.ProductQuantizer(60, num_subspaces=8), "num_subspaces=8 with dim=60"),
        (lambda: stabq.FSQ([]), "levels=[]"),
        (lambda: stabq.FSQ([1, 4]), "levels=[1, 4]"),
        (lambda: build_quantizer("pq", 100), "num_subspaces=8 with dim=100"),
    ],
)
def test_bad_arguments_raise_a_stabq_error_naming_argument_and_value(call, fragment):
    with pytest.raises(StabqError, match="allowed") as err:
        call()
    assert fragment in str(err.value)
    assert isinstance(err.value, ValueError)  # a plain `except ValueError` still catches it


@pytest.mark.parametrize(
    ("size", "levels"),
    [
        (2**8, [8, 6, 5]),
        (2**10, [8, 5, 5, 5]),
        (2**12, [7, 5, 5, 5, 5]),
        (2**14, [8, 8, 8, 6, 5]),
        (2**16, [8, 8, 8, 5, 5, 5]),
    ],
)
def test_recommended_levels_follow_the_fsq_paper(size, levels):
    assert stabq.recommended_levels(size) == levels
    assert 0.75 * size < math.prod(levels) < 1.1 * size  # about the size asked for


def test_recommended_levels_refuses_other_sizes():
    with pytest.raises(ConfigError, match="codebook_size=1000, allowed is one of"):
        stabq.recommended_levels(1000)
