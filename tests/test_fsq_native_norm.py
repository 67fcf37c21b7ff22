"""FSQ's pre_norm folded into its bound at every size, against the unfused form:
nn.BatchNorm1d(affine=False) then FSQ without pre_norm. Below PACKED_MIN_ELEMENTS the
Function runs torch's own batch norm and its backward: codes, indices, running statistics
and gradients equal bit for bit; above it the packed form agrees up to float rounding."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stabq
from fsq_pairs import LEVELS, pair, run_both
from stabq.quantizers import fsq_norm
from stabq.quantizers.fsq import pre_normalise

EXACT = {"rtol": 0, "atol": 0, "equal_nan": True}


def _function(out):
    """The name of the autograd node that made the codes (past a view of the packed form)."""
    node = out.quantized.grad_fn
    while type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__


def _assert_same(out, grad, ref, ref_grad, fused, reference):
    exact = EXACT
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized, **exact)
    torch.testing.assert_close(grad, ref_grad, **exact)
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(fused.pre_norm.state_dict()[name], buffer, **exact)


@settings(max_examples=60, deadline=None)
@given(
    levels=st.sampled_from(LEVELS),
    rows=st.integers(2, 300),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bound=st.sampled_from(["tanh", "distribution"]),
    momentum=st.sampled_from([0.1, 0.5, None]),
    scale=st.floats(0.01, 50.0),
    seed=st.integers(0, 2**16),
)
def test_small_batches_equal_the_unfused_form_bit_for_bit(
    levels, rows, dtype, bound, momentum, scale, seed
):
    """Three training steps then one at eval: every result equal, running averages too."""
    fused, reference, plain = pair(levels, bound, dtype, momentum)
    gen = torch.Generator().manual_seed(seed)
    for training in (True, True, True, False):
        z = (torch.randn(rows, len(levels), generator=gen, dtype=dtype) + 0.3) * scale
        upstream = torch.randn(rows, len(levels), generator=gen, dtype=dtype)
        out, grad, ref, ref_grad = run_both(fused, reference, plain, z, training, upstream)
        assert _function(out) == "_NativeNormBoundRoundBackward"
        _assert_same(out, grad, ref, ref_grad, fused, reference)


@pytest.mark.parametrize("bad", [1e30, -1e30, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("training", [True, False])
def test_small_batches_beyond_the_clamp_equal_the_unfused_form(bad, training):
    """The clamp and its gradient (none beyond the limit, none at NaN) as autograd's."""
    fused, reference, plain = pair(LEVELS[1], "tanh", torch.float32)
    z = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    z[3, 2] = bad
    upstream = torch.randn(32, 4)
    out, grad, ref, ref_grad = run_both(fused, reference, plain, z, training, upstream)
    _assert_same(out, grad, ref, ref_grad, fused, reference)


def test_sum_of_codes_gradient_equals_the_unfused_form():
    """A user's ``quantized.sum().backward()`` (an expanded gradient) gives the same."""
    fused, reference, plain = pair(LEVELS[0], "tanh", torch.float32)
    z = torch.randn(128, 6, generator=torch.Generator().manual_seed(2)) * 3
    zf, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    fused(zf).quantized.sum().backward()
    plain(pre_normalise(reference.train(), zr)).quantized.sum().backward()
    assert torch.equal(zf.grad, zr.grad)


@pytest.mark.parametrize("rows", [fsq_norm.PACKED_MIN_ELEMENTS // 6 + 1, 4096, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_large_batches_agree_with_the_unfused_form(rows, dtype, training):
    """The packed form (its own statistics, the sigmoid bound for float32 from 2^16
    elements): the same codes but for rows within float rounding of a boundary."""
    fused, reference, plain = pair(LEVELS[0], "tanh", dtype)
    gen = torch.Generator().manual_seed(rows)
    z = (torch.randn(rows, 6, generator=gen) * 3 + 1).to(dtype)
    upstream = torch.randn(rows, 6, generator=gen).to(dtype)
    out, grad, ref, ref_grad = run_both(fused, reference, plain, z, training, upstream)
    assert _function(out) == "_NormBoundRoundBackward"
    same = out.indices == ref.indices
    assert same.float().mean() > 0.9999
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(out.quantized[same], ref.quantized[same], **tol)
    torch.testing.assert_close(grad[same], ref_grad[same], **tol)
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(fused.pre_norm.state_dict()[name], buffer, **tol)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(2, 300),
    dim=st.sampled_from([3, 32, 128]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bound=st.sampled_from(["tanh", "distribution"]),
    seed=st.integers(0, 2**16),
)
def test_projections_in_the_same_node_equal_the_modules_bit_for_bit(rows, dim, dtype, bound, seed):
    """``FSQ(dim=...)``: project_in, pre_norm, the bound and project_out in one node give
    the outputs, indices, input and weight gradients and running statistics of the modules
    run one after the other (three training steps, then eval)."""
    torch.manual_seed(seed)
    fused = stabq.FSQ(LEVELS[0], dim=dim, pre_norm=True, bound=bound).to(dtype)
    apart = copy.deepcopy(fused)
    apart._projected = lambda x: False
    gen = torch.Generator().manual_seed(seed)
    for training in (True, True, True, False):
        x = torch.randn(rows, dim, generator=gen, dtype=dtype) * 2
        up = torch.randn(rows, dim, generator=gen, dtype=dtype)
        results, ran = [], []
        for q in (fused, apart):
            q.train(training)
            xx = x.clone().requires_grad_()
            out = q(xx)
            out.quantized.backward(up)
            grads = [p.grad for p in q.parameters()]
            results.append([out.quantized, out.indices, xx.grad, *grads, *q.state_dict().values()])
            ran.append(_function(out))
        assert ran[0] == "_NativeNormBoundRoundBackward"
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, **EXACT)
