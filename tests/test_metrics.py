"""CodebookUsage against hand-computed figures."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stabq import CodebookUsage, ResidualVQ, ShapeError, VectorQuantizer


def test_one_codebook_against_hand_computation():
    usage = CodebookUsage(4)
    usage.update(torch.tensor([0, 0, 1]))
    usage.update(torch.tensor([[2, 0], [-1, -1]]))  # -1: quantization disabled, ignored
    result = usage.compute()
    # counts [3, 1, 1, 0] of 5: p = 0.6, 0.2, 0.2
    entropy = -(0.6 * math.log2(0.6) + 2 * 0.2 * math.log2(0.2))
    assert result["samples"] == 5
    assert result["usage"] == 0.75
    assert result["dead_codes"] == 1
    assert result["entropy_bits"] == pytest.approx(entropy, rel=1e-12)
    assert result["perplexity"] == pytest.approx(2**entropy, rel=1e-12)


def test_several_codebooks_are_measured_apart_and_averaged():
    usage = CodebookUsage(2, num_codebooks=2)
    usage.update(torch.tensor([[0, 1], [1, 1], [0, 1], [1, 1]]))
    result = usage.compute()
    first, second = result["per_codebook"]
    assert first["perplexity"] == pytest.approx(2.0) and first["usage"] == 1.0
    assert second["perplexity"] == pytest.approx(1.0) and second["dead_codes"] == 1
    assert result["perplexity"] == pytest.approx(1.5)
    assert result["usage"] == pytest.approx(0.75)


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 40), data=st.data())
def test_perplexity_lies_between_one_and_the_codes_used(k, data):
    idx = data.draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=200))
    usage = CodebookUsage(k)
    usage.update(torch.tensor(idx))
    result = usage.compute()
    used = len(set(idx))
    assert 1.0 - 1e-9 <= result["perplexity"] <= used + 1e-9
    assert result["usage"] == used / k
    assert result["dead_codes"] == k - used


def test_uniform_use_gives_perplexity_equal_to_the_codebook_size():
    usage = CodebookUsage(16)
    usage.update(torch.arange(16).repeat(5))
    assert usage.compute()["perplexity"] == pytest.approx(16.0, rel=1e-12)
    usage.reset()
    assert usage.compute()["samples"] == 0 and usage.compute()["usage"] == 0.0


def test_sized_from_a_quantizer():
    assert CodebookUsage.for_quantizer(VectorQuantizer(8, 64)).counts.shape == (1, 64)
    rvq = ResidualVQ(8, num_quantizers=3, codebook_size=16)
    usage = CodebookUsage.for_quantizer(rvq)
    rvq.eval()
    usage.update(rvq(torch.randn(10, 8)).indices)
    assert usage.counts.shape == (3, 16) and usage.compute()["samples"] == 10


def test_bad_indices_are_refused():
    with pytest.raises(ShapeError, match="out of range"):
        CodebookUsage(4).update(torch.tensor([4]))
    with pytest.raises(ShapeError, match="num_codebooks=2"):
        CodebookUsage(4, num_codebooks=2).update(torch.tensor([0, 1, 2]))
    with pytest.raises(ShapeError, match="integers"):
        CodebookUsage(4).update(torch.tensor([0.0]))
