"""iFSQ: `FSQ(bound="distribution")` and the `ifsq` preset.

The bound is ``b = tanh(0.8 z) * L (1 - eps) / 2 - offset`` (iFSQ's ``2 sigmoid(1.6 z) -
1`` spread over ``L`` whole rounding units, no shift), rounded to ``r``; the codes are
``r / (L // 2)`` and the indices FSQ's mixed radix. A float64 brute force of that formula
is the reference for both kernel forms and the compile path.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stabq
from stabq import FSQ, BottleneckClassifier, CodebookUsage, CollapseMonitor, ConfigError
from stabq.quantizers.fsq import BOUND_EPS, fsq_bound_round, fsq_bound_round_plain
from stabq.swap import SwappedFSQ, swap_quantizers

LEVEL_LISTS = [[8, 8, 8, 5, 5, 5], [16, 16, 16, 16], [2, 3, 4, 7], [13, 12]]


def reference(
    z: torch.Tensor, levels: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, indices and each value's distance to a rounding tie, one dimension and one
    row at a time in float64 (Python ints for the index)."""
    z = z.double()
    codes, ties = torch.empty_like(z), torch.empty_like(z)
    for j, level in enumerate(levels):
        offset = 0.5 if level % 2 == 0 else 0.0
        b = torch.tanh(0.8 * z[:, j]) * level * (1 - BOUND_EPS) / 2 - offset
        codes[:, j] = torch.round(b) / (level // 2)
        ties[:, j] = (b - b.floor() - 0.5).abs()
    indices = []
    for row in codes.tolist():
        index, radix = 0, 1
        for code, level in zip(row, levels, strict=True):
            index += (round(code * (level // 2)) + level // 2) * radix
            radix *= level
        indices.append(index)
    return codes, torch.tensor(indices), ties.amin(dim=1)


@pytest.mark.parametrize("levels", LEVEL_LISTS)
@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_every_path_rounds_as_the_float64_reference(levels, scale):
    gen = torch.Generator().manual_seed(len(levels) * 10 + int(scale))
    z = torch.randn(1024, len(levels), generator=gen) * scale
    want_codes, want_indices, tie = reference(z, levels)
    clear = tie > 1e-4  # float32 against float64: a value this near a tie may round either way
    assert clear.float().mean() > 0.95
    lv = torch.tensor(levels, dtype=torch.int32)
    found = [fsq_bound_round(z, lv, sigmoid=s, bound="distribution") for s in (False, True)]
    found.append(fsq_bound_round_plain(z, levels, "distribution"))
    found.append(FSQ(levels, bound="distribution")(z)[:2])
    for codes, indices in found:
        assert codes.dtype == torch.float32 and indices.dtype == torch.int64
        assert torch.equal(codes[clear], want_codes[clear].float())
        assert torch.equal(indices[clear], want_indices[clear])


@pytest.mark.parametrize("levels", LEVEL_LISTS)
def test_float64_input_matches_the_reference(levels):
    z = torch.randn(
        512, len(levels), dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    want_codes, want_indices, tie = reference(z * 3, levels)
    clear = tie > 1e-6  # the constants are float32: a value this near a tie may round either way
    for s in (False, True):
        codes, indices = fsq_bound_round(
            z * 3, torch.tensor(levels), sigmoid=s, bound="distribution"
        )
        assert clear.float().mean() > 0.99 and torch.equal(codes[clear], want_codes[clear])
        assert torch.equal(indices[clear], want_indices[clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levels", LEVEL_LISTS[:3])
def test_gradient_equals_the_reference_autograd_gradient(levels, dtype):
    gen = torch.Generator().manual_seed(2)
    z = (torch.randn(256, len(levels), generator=gen) * 2).to(dtype)
    weight = torch.randn(256, len(levels), generator=gen).to(dtype)
    ref_z = z.double().clone().requires_grad_()
    lv = torch.tensor(levels, dtype=torch.float64)
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    b = torch.tanh(0.8 * ref_z) * lv * (1 - BOUND_EPS) / 2 - offset
    ((b + (b.round() - b).detach()) / (lv // 2) * weight.double()).sum().backward()
    # the constants are float32 for every dtype (as FSQ's, like the peer's): float64 input
    # agrees to their precision, float32 input to a few ulp more
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 0}
    paths = [
        lambda x: fsq_bound_round(x, torch.tensor(levels), sigmoid=False, bound="distribution"),
        lambda x: fsq_bound_round(x, torch.tensor(levels), sigmoid=True, bound="distribution"),
        lambda x: fsq_bound_round_plain(x, levels, "distribution"),
    ]
    for path in paths:
        x = z.clone().requires_grad_()
        (path(x)[0] * weight).sum().backward()
        torch.testing.assert_close(x.grad, ref_z.grad.to(dtype), **tol)


@pytest.mark.parametrize("levels", LEVEL_LISTS[:3])
def test_indices_decode_to_the_codes_and_back(levels):
    q = FSQ(levels, bound="distribution")
    out = q(torch.randn(300, len(levels)) * 3)
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
    assert torch.equal(q.codes_to_indices(out.quantized), out.indices)
    every = torch.arange(min(q.codebook_size, 5000))
    assert torch.equal(q.codes_to_indices(q.indices_to_codes(every)), every)


def test_the_monitor_reads_levels_and_saturation_as_for_fsq():
    levels = [8, 6, 5, 3]
    q = FSQ(levels, bound="distribution")
    mon = CollapseMonitor(q, window=3, check_every=100)
    assert mon.levels == levels and mon.codebook_size == math.prod(levels)
    torch.manual_seed(0)
    seen = [q(torch.randn(50, 4) * s).indices for s in (0.5, 2.0, 3.0, 4.0)]
    codes = q.indices_to_level_codes(torch.cat(seen[-3:]))
    top = torch.tensor([((lv - 1) - lv // 2) / (lv // 2) for lv in levels])
    at_bound = (codes == -1) | (codes == top)
    assert mon.report()["saturation"] == pytest.approx(at_bound.float().mean().item())
    mon.detach()


@functools.cache
def normal_sample() -> torch.Tensor:
    return torch.randn(200_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def worst_share_gap(level: int, bound: str) -> float:
    _, indices = fsq_bound_round(normal_sample(), torch.tensor([level]), bound=bound)
    share = torch.bincount(indices, minlength=level).double() / len(indices)
    return float((share - 1 / level).abs().max())


@settings(max_examples=15, deadline=None)
@given(level=st.integers(2, 16))
def test_standard_normal_input_uses_the_levels_more_evenly_than_tanh(level):
    # measured on this sample: the distribution bound's worst gap is 0.001-0.018, at most
    # 0.63 of tanh's (L = 15); sampling error is about 0.001
    gap, tanh_gap = worst_share_gap(level, "distribution"), worst_share_gap(level, "tanh")
    assert gap < 0.02 and gap < 0.75 * tanh_gap


@pytest.mark.parametrize("bound", ["sigmoid", "Tanh", None, 1])
def test_a_bound_not_allowed_is_one_line_naming_it(bound):
    with pytest.raises(
        ConfigError, match=r"^FSQ: bound=.*allowed is one of 'tanh', 'distribution'$"
    ):
        FSQ([8, 5], bound=bound)
    with pytest.raises(ConfigError, match="bound"):
        stabq.build_quantizer("ifsq", 8, bound=bound)


def test_the_preset_builds_the_measured_choice():
    q = stabq.build_quantizer("ifsq", 128)
    assert type(q) is FSQ and q.bound == "distribution" and q.codebook_size == 2**16
    assert q.levels == [16, 16, 16, 16] and q.pre_norm is not None
    monitor = CollapseMonitor(q)
    assert (monitor.codebook_size, monitor.num_codebooks, monitor.levels) == (2**16, 1, q.levels)
    monitor.detach()


def test_the_preset_trains_and_its_usage_counts_its_indices():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    model = BottleneckClassifier(input_dim=12, num_classes=2, quantizer="ifsq", hidden=32)
    result = stabq.train(model, (x, y), config=stabq.TrainConfig(epochs=2, batch_size=32))
    for epoch in result.history:
        assert all(math.isfinite(v) for v in epoch.values() if isinstance(v, float))
    logits, out = model.eval()(torch.from_numpy(x))
    assert torch.isfinite(logits).all()
    usage = CodebookUsage.for_quantizer(model.quantizer)
    usage.update(out.indices)
    found = usage.compute()["per_codebook"][0]
    distinct = out.indices.unique().numel()
    assert distinct > 1 and found["usage"] == pytest.approx(distinct / 2**16)
    assert found["dead_codes"] is None  # a grid: no dead codes


def test_a_peer_fsq_is_swapped_for_the_preset():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    model = nn.Sequential(nn.Linear(5, 16), vqp.FSQ(levels=[8, 5, 5], dim=16))
    report = swap_quantizers(model, "ifsq", levels=[8, 5, 5])
    assert str(report) == "swapped 1 quantizer:\n  1: vector_quantize_pytorch.FSQ -> ifsq (dim 16)"
    swapped = model[1]
    assert isinstance(swapped, SwappedFSQ) and swapped.quantizer.bound == "distribution"
    quantized, indices = model.eval()(torch.randn(7, 5))
    assert quantized.shape == (7, 16) and indices.shape == (7,)
    torch.testing.assert_close(
        swapped.quantizer.indices_to_codes(indices), quantized, rtol=0, atol=0
    )


def test_while_compiling_the_quantizer_takes_the_plain_path_with_its_bound(monkeypatch):
    """What torch.compile traces (the plain form, see tests/test_compile.py) rounds and
    differentiates as the eager kernel for this bound; the eager kernel must not be called."""
    from stabq.quantizers import fsq

    q = FSQ([16, 8, 5], dim=12, bound="distribution", pre_norm=True).eval()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(3)) * 3
    eager_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, want_indices, _ = q(eager_x)
    monkeypatch.setattr(fsq, "compiling", lambda: True)
    monkeypatch.setattr(fsq, "fsq_bound_round", None)  # calling it now would fail
    got, got_indices, _ = q(plain_x)
    assert torch.equal(got_indices, want_indices)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    want.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(plain_x.grad, eager_x.grad, rtol=1e-5, atol=1e-6)
