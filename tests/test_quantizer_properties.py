"""Properties every quantizer keeps over random shapes, dtypes, modes and extreme values.

For any float input ``x`` of shape ``(*lead, dim)`` (``lead`` of 1 to 3 dims, a
batch of 1 included; ``lead`` may also hold a 0: an empty batch is allowed and
gives empty outputs and a zero loss), in float32, float16, bfloat16 or float64,
in train or eval mode, with values from ordinary to extreme (``+-1e30``, or
``+-1e4`` in float16 whose largest value is 65504; subnormals; all entries
equal), every quantizer (FSQ with and without ``pre_norm`` and projections;
VQ vanilla, learned and repaired; residual VQ; product quantization; Gumbel;
SimVQ; residual FSQ; LFQ and BSQ; and every preset of :func:`stabq.build_quantizer`) returns

- ``quantized`` of ``x``'s shape and dtype, finite;
- ``indices`` int64 of shape ``(*lead, *indices_shape)``, in ``[0, codebook_size)``;
- ``loss`` a 0-dim tensor, never NaN and >= 0 (finite while the squared
  distances fit in float32: ``|x| <= 1e15``; ``+inf`` beyond, which the
  training guard skips);
- finite parameters and buffers afterwards (a training pass on extreme input
  does not poison the codebook);

and in eval mode on ordinary input, ``indices_to_codes(indices)`` gives back
``quantized``. Anything but a float tensor ending in ``dim`` is a ShapeError.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stabq
from stabq.errors import ShapeError
from stabq.quantizers import (
    FSQ,
    LFQ,
    GumbelQuantizer,
    ProductQuantizer,
    Quantizer,
    ResidualFSQ,
    ResidualVQ,
    SimVQ,
    VectorQuantizer,
)

DIM = 16
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LARGE = {torch.float16: 1e4}  # other dtypes: 1e30
FACTORIES: dict[str, Callable[[], Quantizer]] = {
    "fsq": lambda: FSQ([3, 5, 4]),
    "fsq-proj": lambda: FSQ([8, 5], dim=DIM),
    "fsq-pre-norm": lambda: FSQ([3, 3], pre_norm=True),
    "fsq-proj-pre-norm": lambda: FSQ([8, 5, 5], dim=DIM, pre_norm=True),
    "vq": lambda: VectorQuantizer(DIM, 16),
    "vq-learned": lambda: VectorQuantizer(DIM, 16, decay=None, rotation_trick=True),
    "vq-repaired": lambda: VectorQuantizer(
        DIM, 16, codebook_dim=4, kmeans_init=True, kmeans_iters=2,
        dead_code_threshold=2.0, cosine=True, rotation_trick=True,
    ),
    "vq-dead-codes": lambda: VectorQuantizer(DIM, 32, kmeans_init=True, dead_code_threshold=5.0),
    "rvq": lambda: ResidualVQ(
        DIM, num_quantizers=3, codebook_size=8, kmeans_init=True, kmeans_iters=2,
        dead_code_threshold=1.0, codebook_dim=6,
    ),
    "rvq-rotation": lambda: ResidualVQ(DIM, 2, 8, decay=None, rotation_trick=True),
    "pq": lambda: ProductQuantizer(DIM, num_subspaces=4, bits=3),
    "pq-kmeans": lambda: ProductQuantizer(
        DIM, num_subspaces=2, bits=4, kmeans_init=True, kmeans_iters=2, dead_code_threshold=1.0
    ),
    "gumbel": lambda: GumbelQuantizer(DIM, 8),
    "gumbel-hard": lambda: GumbelQuantizer(DIM, 8, hard=True, kl_weight=0.1),
    "simvq": lambda: SimVQ(DIM, 16),
    "simvq-kmeans": lambda: SimVQ(DIM, 16, init="kmeans", kmeans_iters=2),
    "simvq-rotation": lambda: SimVQ(DIM, 16, rotation_trick=True),
    "rfsq": lambda: ResidualFSQ([3, 4, 5], 3),
    "rfsq-proj-pre-norm": lambda: ResidualFSQ([2, 5], 2, dim=DIM, pre_norm=True),
    "lfq": lambda: LFQ(DIM, 4, num_codebooks=4, commitment_weight=0.25),
    "bsq-proj": lambda: LFQ(DIM, 5, spherical=True),
    **{
        f"preset-{name}": (lambda name=name: stabq.build_quantizer(name, DIM))
        for name in stabq.preset_names()
        if name != "none"
    },
}  # fmt: skip


def fresh(name: str, seed: int) -> Quantizer:
    """A new instance of quantizer ``name`` with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return FACTORIES[name]()


@st.composite
def inputs(draw, dim: int) -> torch.Tensor:
    """A float tensor ``(*lead, dim)`` of one dtype and one kind of values."""
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    kind = draw(st.sampled_from(["normal", "scaled", "large", "subnormal", "equal", "mixed"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (*lead, dim)
    big = LARGE.get(dtype, 1e30)
    tiny = torch.finfo(dtype).smallest_normal / 8  # below the normal range: subnormal
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    signs = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
    if kind == "scaled":
        x = x * 10.0 ** draw(st.integers(-6, 6))
    elif kind == "large":
        x = signs * big
    elif kind == "subnormal":
        x = signs * tiny * torch.randint(1, 4, shape, generator=gen)
    elif kind == "equal":
        x = torch.full(shape, draw(st.sampled_from([0.0, 1.0, -3.5, big, -big])))
    elif kind == "mixed":
        mask = torch.rand(shape, generator=gen) < 0.2
        x = torch.where(mask, signs * big, x)
    return x.clamp(-big, big).to(dtype)  # "scaled" float16 would overflow to inf


def magnitude(x: torch.Tensor) -> float:
    return float(x.double().abs().max()) if x.numel() else 0.0


def check_output(q: Quantizer, x: torch.Tensor) -> stabq.QuantizerOutput:
    out = q(x)
    lead = tuple(x.shape[:-1])
    assert out.quantized.shape == x.shape and out.quantized.dtype == x.dtype
    assert torch.isfinite(out.quantized).all(), "non-finite quantized output"
    assert out.indices.dtype == torch.int64
    assert tuple(out.indices.shape) == lead + q.indices_shape
    if out.indices.numel():
        assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    assert out.loss.dim() == 0 and not math.isnan(float(out.loss)) and float(out.loss) >= 0
    if magnitude(x) <= 1e15:
        assert math.isfinite(float(out.loss)), float(out.loss)
    for name, t in [*q.named_parameters(), *q.named_buffers()]:
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{name} is no longer finite"
    return out


# A fixed, modest set of examples in the suite; STABQ_FUZZ_EXAMPLES=500 explores afresh.
EXAMPLES = int(os.environ.get("STABQ_FUZZ_EXAMPLES", "0"))
PROPERTY = settings(
    max_examples=EXAMPLES or 30,
    derandomize=not EXAMPLES,
    deadline=5000,  # a hang fails; one example takes milliseconds
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("name", list(FACTORIES))
@given(data=st.data(), seed=st.integers(0, 1000), training=st.booleans())
@PROPERTY
def test_outputs_are_finite_in_range_and_shaped(name, data, seed, training):
    q = fresh(name, seed).train(training)
    x = data.draw(inputs(q.dim), label="x")
    with torch.no_grad():
        check_output(q, x)
        check_output(q, x)  # a second pass sees the state the first one left


@pytest.mark.parametrize("name", list(FACTORIES))
@given(data=st.data(), seed=st.integers(0, 1000))
@PROPERTY
def test_eval_output_decodes_from_its_indices(name, data, seed):
    q = fresh(name, seed).eval()
    x = (
        data.draw(inputs(q.dim), label="x").double().clamp(-1e3, 1e3).float()
    )  # ordinary magnitudes: exact round trips
    with torch.no_grad():
        out = q(x)
        decoded = q.indices_to_codes(out.indices)
    torch.testing.assert_close(decoded.to(out.quantized.dtype), out.quantized, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_empty_batch_gives_empty_outputs_and_a_zero_loss(name, training):
    q = fresh(name, 0).train(training)
    for shape in [(0, q.dim), (3, 0, q.dim)]:
        out = q(torch.zeros(shape))
        assert out.quantized.shape == shape
        assert tuple(out.indices.shape) == shape[:-1] + q.indices_shape
        assert float(out.loss) == 0.0


@pytest.mark.parametrize("name", list(FACTORIES))
def test_anything_but_a_float_tensor_ending_in_dim_is_a_shape_error(name):
    q = fresh(name, 0)
    dim = q.dim
    for bad, fragment in [
        (torch.zeros(4, dim + 1), f"has last dimension {dim + 1}, expected dim={dim}"),
        (torch.zeros(4, dim, dim + 3), f"has last dimension {dim + 3}"),
        (torch.zeros(()), "has last dimension none"),
        (torch.zeros(4, dim, dtype=torch.int64), "must be a floating-point tensor"),
        (torch.zeros(4, dim, dtype=torch.bool), "must be a floating-point tensor"),
        ([[0.0] * dim], "must be a floating-point tensor, found list"),
    ]:
        with pytest.raises(ShapeError, match=fragment):
            q(bad)


def test_fsq_pre_norm_recovers_from_a_batch_of_huge_values():
    # Before the clamp, one training batch of +-1e30 made running_var inf for good: every
    # later eval input normalised to 0 and got one code. Now the running variance is
    # finite and the momentum forgets it, as it forgets any outlier batch.
    torch.manual_seed(0)
    q = FSQ([5, 5], pre_norm=True).train()
    with torch.no_grad():
        q(torch.where(torch.rand(64, 2) < 0.5, -1e30, 1e30))
        assert torch.isfinite(q.pre_norm.running_var).all()
        for _ in range(1000):
            q(torch.randn(64, 2))
        q.eval()
        indices = q(torch.randn(256, 2)).indices
    assert indices.unique().numel() > 5
