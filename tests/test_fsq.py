"""FSQ: exact codes and indices, the reference implementation, saturation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stabq import FSQ, ConfigError, ShapeError
from stabq.quantizers.fsq import BOUND_EPS, fsq_bound_round_plain, fsq_constants

# [13, 12, 7, 7]: half widths of 6 and 3, where r * (1 / w) and r / w differ in the last bit
LEVEL_LISTS = [
    [8, 8, 8, 5, 5, 5],
    [7, 5, 5, 5, 5],
    [8, 6, 5],
    [2, 3],
    [4, 4],
    [3],
    [2, 2, 2, 9],
    [13, 12, 7, 7],
]


@pytest.mark.parametrize("levels", LEVEL_LISTS)
def test_indices_and_codes_are_a_bijection_over_the_whole_codebook(levels):
    fsq = FSQ(levels)
    size = math.prod(levels)
    assert fsq.codebook_size == size
    every = torch.arange(size)
    codes = fsq.indices_to_level_codes(every)
    assert codes.shape == (size, len(levels))
    assert torch.equal(fsq.codes_to_indices(codes), every)
    assert torch.unique(codes, dim=0).shape[0] == size  # distinct codes
    assert codes.min() >= -1 and codes.max() <= 1
    # every coordinate sits on the grid r / (L // 2) with r an integer in [-(L//2), (L-1)//2]
    half = torch.tensor([lv // 2 for lv in levels])
    r = codes * half
    assert torch.equal(r, r.round())
    assert torch.equal(r.amin(0), -half.float())
    assert torch.equal(r.amax(0), torch.tensor([(lv - 1) // 2 for lv in levels]).float())


@pytest.mark.parametrize("levels", LEVEL_LISTS)
def test_forward_codes_and_indices_agree_with_the_mixed_radix_formula(levels):
    torch.manual_seed(0)
    fsq = FSQ(levels)
    x = torch.randn(2000, len(levels)) * 2
    q, idx, loss = fsq(x)
    assert idx.dtype == torch.int64 and loss.item() == 0.0
    half = torch.tensor([lv // 2 for lv in levels])
    level_idx = (q * half + half).round().long()
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    assert torch.equal(idx, (level_idx * basis).sum(-1))
    assert torch.equal(fsq.indices_to_codes(idx), q)


def clear_of_ties(x: torch.Tensor, levels: list[int], margin: float = 1e-5) -> torch.Tensor:
    """Rows of ``x`` ``(..., d)`` whose bounded values, computed in float64, all lie more than
    ``margin`` from a rounding tie (``k + 0.5``)."""
    shift, half_l, neg_offset, _, _ = fsq_constants(torch.tensor(levels)).double()
    b = torch.tanh(x.double() + shift) * half_l + neg_offset
    return ((b - b.floor() - 0.5).abs() > margin).all(-1)


def _reference_levels():
    # vector-quantize-pytorch refuses a level of 2 without its preserve_symmetry mode
    return [lv for lv in LEVEL_LISTS if 2 not in lv]


@pytest.mark.parametrize("levels", _reference_levels())
@settings(max_examples=15, deadline=None)
@given(
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31 - 1),
    # rows packed 1, 16 and 2 at a time; 16,384 x 3 rows take the sigmoid form (test_fsq_forms)
    rows=st.sampled_from([257, 256, 1366, 16384]),
)
def test_codes_and_indices_equal_vector_quantize_pytorch(levels, scale, seed, rows):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, rows, len(levels), generator=gen) * scale
    ours = FSQ(levels)
    ref = vqp.FSQ(levels)
    q, idx, _ = ours(x)
    ref_q, ref_idx = ref(x)
    # Equal wherever the bounded value is not on a rounding tie: there a last-bit difference
    # between two correct kernels (a fused multiply-add, another tanh) may rightly flip a
    # level, on some processors and not others. Such rows are rare and differ by one level.
    clear = clear_of_ties(x, levels)
    assert clear.float().mean() > 0.99
    assert torch.equal(q[clear], ref_q[clear])
    assert torch.equal(idx[clear], ref_idx.long()[clear])
    half = torch.tensor([lv // 2 for lv in levels])
    assert ((q - ref_q).abs() * half <= 1).all()
    every = torch.arange(ours.codebook_size)
    assert torch.equal(ours.indices_to_codes(every), ref.indices_to_codes(every))


def test_projection_layers_match_reference_given_the_same_weights():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(1)
    levels = [8, 5, 5, 5]
    ours, ref = FSQ(levels, dim=32), vqp.FSQ(levels, dim=32)
    ours.project_in.load_state_dict(ref.project_in.state_dict())
    ours.project_out.load_state_dict(ref.project_out.state_dict())
    x = torch.randn(4, 50, 32)
    q, idx, _ = ours(x)
    ref_q, ref_idx = ref(x)
    torch.testing.assert_close(q, ref_q, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx.long())
    assert torch.equal(ours.indices_to_codes(idx), q)


def test_rounding_passes_the_gradient_straight_through():
    """d quantized / d x equals the derivative of the bound alone: rounding adds nothing."""
    levels = [8, 5, 4, 3]
    fsq = FSQ(levels)
    x = (torch.randn(500, len(levels)) * 1.5).requires_grad_()
    weights = torch.randn(500, len(levels))
    (fsq(x).quantized * weights).sum().backward()
    lv = torch.tensor(levels, dtype=torch.float32)
    half_l = (lv - 1) * (1 + BOUND_EPS) / 2
    shift = torch.atanh(torch.where(lv % 2 == 0, 0.5, 0.0) / half_l)
    x2 = x.detach().clone().requires_grad_()
    ((torch.tanh(x2 + shift) * half_l / torch.floor(lv / 2)) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [4096, 1366, 257])  # rows packed 16, 2 and 1 at a time
@pytest.mark.parametrize("levels", [[8, 8, 8, 5, 5, 5], [13, 12, 7, 7], [2, 3]])
def test_gradients_are_autograd_of_the_plain_bound(levels, rows, dtype):
    """The fused Function's gradient is bit for bit autograd's through ``tanh(z + shift)``
    times the straight-through slope ``half_l / half_width``, for a random upstream
    gradient and for ``quantized.sum()``'s expanded one; within rounding of autograd
    through the whole plain formula (``fsq_bound_round_plain``), whose codes and indices
    it equals away from rounding ties. The upstream gradient is left as it was, and
    backward after ``retain_graph`` or ``create_graph`` gives the same gradient."""
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, len(levels), generator=gen) * 2).to(dtype)
    shift, _, _, _, slope = fsq_constants(torch.tensor(levels)).to(dtype)
    fsq = FSQ(levels).to(dtype)
    for upstream in (torch.randn(x.shape, generator=gen).to(dtype), None):
        z = x.clone().requires_grad_()
        out = fsq(z)
        kept = None if upstream is None else upstream.clone()
        grad = torch.ones_like(x) if upstream is None else upstream
        if upstream is None:
            out.quantized.sum().backward(retain_graph=True)
        else:
            out.quantized.backward(upstream, retain_graph=True)
            assert torch.equal(upstream, kept)  # not written into
        first = z.grad.clone()
        (again,) = torch.autograd.grad(out.quantized, z, grad, retain_graph=True, create_graph=True)
        assert torch.equal(again, first)
        z.grad = None
        out.quantized.backward(grad)  # the last: backward may reuse what it kept
        assert torch.equal(z.grad, first)  # what backward keeps is intact after a backward
        ref_z = x.clone().requires_grad_()
        (bound_grad,) = torch.autograd.grad(torch.tanh(ref_z + shift), ref_z, grad)
        assert torch.equal(first, bound_grad * slope)
        plain_z = x.clone().requires_grad_()
        codes, indices = fsq_bound_round_plain(plain_z, levels)
        codes.backward(grad)
        # the constants are float32 (the peer's) in float64 too: slope is rounded once there
        rtol = 4 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(first, plain_z.grad, rtol=rtol, atol=0)
        clear = clear_of_ties(x, levels)
        assert clear.float().mean() > 0.99
        assert torch.equal(out.quantized[clear], codes.detach()[clear])
        assert torch.equal(out.indices[clear], indices[clear])


def test_textbook_fsq_saturates_on_large_inputs_and_pre_norm_does_not():
    """Inputs far out on the tanh all round to corner codes; normalising first keeps them spread."""
    torch.manual_seed(0)
    levels = [8, 8, 8, 5, 5, 5]
    x = torch.randn(4096, 6) * 1e3
    plain, normed = FSQ(levels), FSQ(levels, pre_norm=True)
    q_plain, _, _ = plain(x)
    normed.train()
    q_norm, idx_norm, _ = normed(x)
    top = torch.tensor([(lv - 1) // 2 / (lv // 2) for lv in levels])
    at_bound = (q_plain == -1) | (q_plain == top)
    assert at_bound.float().mean() > 0.99  # nearly every value sits on the bound
    assert ((q_norm == -1) | (q_norm == top)).float().mean() < 0.5
    assert idx_norm.unique().numel() > 1000
    # the gradient through a saturated tanh vanishes; through the normalised bound it does not
    xg = x.clone().requires_grad_()
    plain(xg).quantized.sum().backward()
    assert (xg.grad.abs() < 1e-6).float().mean() > 0.99
    xg.grad = None
    normed(xg).quantized.sum().backward()
    assert (xg.grad.abs() > 1e-8).float().mean() > 0.9


def test_pre_norm_uses_running_statistics_in_eval_and_for_a_single_row():
    torch.manual_seed(0)
    fsq = FSQ([5, 5, 5], dim=16, pre_norm=True)
    for _ in range(20):
        fsq(torch.randn(256, 16) * 3 + 1)
    one = torch.randn(1, 16)
    q_train_single = fsq(one).quantized  # one row in training: running statistics
    fsq.eval()
    assert torch.equal(fsq(one).quantized, q_train_single)
    batch = torch.randn(64, 16)
    assert torch.equal(fsq(batch).quantized[:1], fsq(batch[:1]).quantized)


def test_projection_when_dim_differs_from_the_number_of_levels():
    fsq = FSQ([8, 5, 5, 5], dim=128)
    assert fsq.project_in.in_features == 128 and fsq.project_in.out_features == 4
    q, idx, _ = fsq(torch.randn(7, 3, 128))
    assert q.shape == (7, 3, 128) and idx.shape == (7, 3)
    torch.testing.assert_close(fsq.indices_to_codes(idx), q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_precision_inputs(dtype):
    fsq = FSQ([8, 6, 5])
    x = torch.randn(100, 3)
    q, idx, _ = fsq(x.to(dtype))
    assert q.dtype == dtype
    assert torch.equal(idx, fsq(x.to(dtype).float())[1])


@pytest.mark.parametrize(
    ("levels", "fragment"),
    [([], "levels=[]"), ([8, 1], "levels=[8, 1]"), ([8, 2.5], "levels=[8, 2.5]"), (5, "levels=5")],
)
def test_bad_levels_are_refused_with_the_argument_named(levels, fragment):
    with pytest.raises(ConfigError, match="integers >= 2") as err:
        FSQ(levels)
    assert fragment in str(err.value)


def test_dim_mismatch_at_forward_names_both_sizes():
    with pytest.raises(ShapeError, match=r"last dimension 5, expected dim=6"):
        FSQ([8, 8, 8, 5, 5, 5])(torch.randn(3, 5))


def test_out_of_range_indices_are_refused():
    fsq = FSQ([3, 3])
    with pytest.raises(ShapeError, match=r"allowed is \[0, 8\]"):
        fsq.indices_to_codes(torch.tensor([0, 9]))
