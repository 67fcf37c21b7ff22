"""FSQ's sigmoid form against its tanh form (``stabq.quantizers.fsq._BoundRound``).

The sigmoid form rounds ``2 sigmoid(2 (z + shift)) - 1`` in place of ``tanh(z + shift)``
and decides the rows within its error window of a rounding tie by tanh itself, so the two
forms give the same codes and indices; the window is what makes that so, and a test below
fails without it. The gradients are the same derivative, ``4 s (1 - s) = 1 - tanh^2``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stabq import FSQ
from stabq.quantizers import fsq
from stabq.quantizers.fsq import fsq_bound_round, fsq_constants

# even dimension counts: rows packed 16 at a time then fill whole vector registers, so
# that both forms run tanh on the vector path for every value (see tie_inputs)
LEVEL_LISTS = [[8, 8, 8, 5, 5, 5], [13, 12, 7, 7], [8, 5, 5, 5], [4, 3]]


def both_forms(z: torch.Tensor, levels: list[int], cache: dict | None = None):
    lv = torch.tensor(levels, dtype=torch.int32)
    return fsq_bound_round(z, lv, sigmoid=False), fsq_bound_round(z, lv, cache, sigmoid=True)


def tie_inputs(levels: list[int], rows: int, jitter: float, seed: int) -> torch.Tensor:
    """``z`` ``(rows, d)`` whose bounded values ``tanh(z + shift) half_l - offset`` lie
    within about ``jitter`` of a rounding tie ``k + 1/2`` (built in float64, then float32).

    ``rows`` is a multiple of 64, so the tanh form's tensor and the threads' halves of it
    end on whole vector registers: torch computes every value's tanh with the same kernel
    (the last, partial register of a kernel call goes through the scalar one), and both
    forms must then agree even on a tie itself."""
    assert rows % 64 == 0
    gen = torch.Generator().manual_seed(seed)
    shift, half_l, neg_offset, _, _ = fsq_constants(torch.tensor(levels)).double()
    columns = []
    for j, level in enumerate(levels):
        lo, hi = -half_l[j] + neg_offset[j], half_l[j] + neg_offset[j]
        ties = torch.arange(-level, level, dtype=torch.float64) + 0.5
        ties = ties[(ties > lo + 1e-3) & (ties < hi - 1e-3)]
        pick = ties[torch.randint(len(ties), (rows,), generator=gen)]
        b = pick + (torch.rand(rows, generator=gen, dtype=torch.float64) * 2 - 1) * jitter
        columns.append(torch.atanh((b - neg_offset[j]) / half_l[j]) - shift[j])
    return torch.stack(columns, 1).float()


def clear_of_ties(z: torch.Tensor, levels: list[int], margin: float) -> torch.Tensor:
    shift, half_l, neg_offset, _, _ = fsq_constants(torch.tensor(levels)).double()
    b = torch.tanh(z.double() + shift) * half_l + neg_offset
    return ((b - b.floor() - 0.5).abs() > margin).all(-1)


@pytest.mark.parametrize("levels", LEVEL_LISTS)
@settings(max_examples=12, deadline=None)
@given(
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31 - 1),
    rows=st.sampled_from([4096, 4099, 1366]),  # rows packed 16, 1 and 2 at a time
)
def test_the_forms_give_the_same_codes_and_indices(levels, scale, seed, rows):
    z = torch.randn(rows, len(levels), generator=torch.Generator().manual_seed(seed)) * scale
    (codes, indices), (codes_s, indices_s) = both_forms(z, levels)
    if rows % 64 == 0:  # every value through the same tanh kernel (tie_inputs)
        clear = torch.ones(rows, dtype=torch.bool)
    else:  # a value at a last-register tie may rightly round either way
        clear = clear_of_ties(z, levels, 1e-6)
    assert torch.equal(codes_s[clear], codes[clear])
    assert torch.equal(indices_s[clear], indices[clear])


@pytest.mark.parametrize("levels", LEVEL_LISTS)
@pytest.mark.parametrize("jitter", [0.0, 1e-7, 1e-6, 1e-5])
def test_rows_near_a_tie_are_decided_by_tanh(levels, jitter):
    z = tie_inputs(levels, 4096, jitter, seed=len(levels))
    (codes, indices), (codes_s, indices_s) = both_forms(z, levels)
    assert torch.equal(codes_s, codes)
    assert torch.equal(indices_s, indices)


@pytest.mark.parametrize("levels", LEVEL_LISTS)
def test_without_the_window_the_sigmoid_form_rounds_ties_differently(levels):
    """Must fail: the same tie inputs, the window set to 0 (no row computed again by tanh):
    the sigmoid form alone rounds some ties the other way, by one level. (Within 3e-7 of
    the ties rather than on them: [4, 3] has five ties, too few values to differ on.)"""
    z = tie_inputs(levels, 4096, 3e-7, seed=len(levels))
    lv = torch.tensor(levels, dtype=torch.int32)
    tiled = fsq._tiled(lv, 16, torch.float32, torch.device("cpu"))
    no_window = {
        (z.device, z.dtype, 16): (
            tiled._replace(window=0.0),
            fsq._RoundIndex(lv, z.dtype, z.device, 16),
        )
    }
    (codes, _), (codes_s, _) = both_forms(z, levels, no_window)
    differ = codes_s != codes
    assert differ.any()
    steps = (codes_s - codes).abs() * torch.tensor([v // 2 for v in levels])
    torch.testing.assert_close(steps[differ], torch.ones(int(differ.sum())))  # one level


@pytest.mark.parametrize("levels", LEVEL_LISTS)
@pytest.mark.parametrize("rows", [4096, 1366])
def test_the_sigmoid_forms_gradient(levels, rows):
    """Bit for bit autograd's through ``2 sigmoid(2 (z + shift)) - 1`` times the
    straight-through slope, within a few ulp of ``slope`` of the tanh form's, for a random
    upstream gradient and for ``sum()``'s expanded one; the upstream gradient is left as it
    was, and backward after ``retain_graph`` or ``create_graph`` gives the same gradient."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, len(levels), generator=gen) * 2
    shift, _, _, _, slope = fsq_constants(torch.tensor(levels))
    lv = torch.tensor(levels, dtype=torch.int32)
    for upstream in (torch.randn(x.shape, generator=gen), None):
        grad = torch.ones_like(x) if upstream is None else upstream
        kept = grad.clone()
        z = x.clone().requires_grad_()
        codes, _ = fsq_bound_round(z, lv, sigmoid=True)
        if upstream is None:
            codes.sum().backward(retain_graph=True)
        else:
            codes.backward(upstream, retain_graph=True)
        assert torch.equal(grad, kept)  # not written into
        first = z.grad.clone()
        (again,) = torch.autograd.grad(codes, z, grad, retain_graph=True, create_graph=True)
        assert torch.equal(again, first)
        z.grad = None
        codes.backward(grad)  # the last: backward may reuse what it kept
        assert torch.equal(z.grad, first)
        ref = x.clone().requires_grad_()
        (bound,) = torch.autograd.grad(2 * torch.sigmoid(2 * (ref + shift)) - 1, ref, grad)
        assert torch.equal(first, bound * slope)
        tanh_z = x.clone().requires_grad_()
        fsq_bound_round(tanh_z, lv, sigmoid=False)[0].backward(grad)
        eps = torch.finfo(torch.float32).eps
        atol = 16 * eps * float(slope.max()) * float(grad.abs().max())
        torch.testing.assert_close(first, tanh_z.grad, rtol=16 * eps, atol=atol)


def test_the_sigmoid_form_is_picked_only_where_it_was_measured_faster():
    levels = torch.tensor([8, 8, 8, 5, 5, 5], dtype=torch.int32)
    tiled = fsq._tiled(levels, 16, torch.float32, torch.device("cpu"))
    rows = fsq.SIGMOID_MIN_ELEMENTS // 6 + 16
    vector = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert fsq._use_sigmoid(torch.zeros(rows, 6), tiled) == vector
    assert not fsq._use_sigmoid(torch.zeros(rows // 2, 6), tiled)  # too small
    assert not fsq._use_sigmoid(torch.zeros(rows, 6, dtype=torch.float64), tiled)
    wide = fsq._tiled(torch.tensor([2**20], dtype=torch.int32), 16, torch.float32, "cpu")
    assert wide.window > 0.01  # levels so fine that float32 cannot tell the forms apart
    assert not fsq._use_sigmoid(torch.zeros(rows * 6, 1), wide)


def test_an_fsq_on_large_inputs_gives_the_tanh_forms_codes():
    """The module picks its form itself; what it gives is the tanh form's on any kernel path."""
    levels = [8, 8, 8, 5, 5, 5]
    z = tie_inputs(levels, 64 * (fsq.SIGMOID_MIN_ELEMENTS // 384 + 1), 1e-6, seed=3)
    out = FSQ(levels)(z)
    codes, indices = fsq_bound_round(z, torch.tensor(levels, dtype=torch.int32), sigmoid=False)
    assert torch.equal(out.quantized, codes)
    assert torch.equal(out.indices, indices)
