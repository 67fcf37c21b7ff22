"""The one-node autograd forms against the operations they stand for: straight-through plus
the commitment loss (VQ, PQ, residual VQ) and the unit-norm rows of cosine VQ."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stabq.quantizers.gradients import (
    commitment_loss,
    l2norm,
    residual_commitment_loss,
    straight_through,
    straight_through_loss,
    unit_rows,
)

EXACT = {"rtol": 0, "atol": 0, "equal_nan": True}


def _grads(fn, z, codes, up, loss_weight):
    zz = z.clone().requires_grad_()
    out, loss = fn(zz, codes)
    use_loss = loss_weight is not None and loss.requires_grad  # an empty batch's loss has none
    terms = [out] + ([loss] if use_loss else [])
    grads = [up] + ([torch.tensor(loss_weight)] if use_loss else [])
    if out.requires_grad:
        torch.autograd.backward(terms, grads)
    return out.detach(), loss.detach(), zz.grad, torch.tensor(loss.requires_grad)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(0, 40),
    dim=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    reduction=st.sampled_from(["mean", "sum"]),
    weight=st.sampled_from([0.0, 0.25, 1.0]),
    loss_weight=st.sampled_from([None, 1.0, 3.5]),
    seed=st.integers(0, 2**16),
)
def test_straight_through_loss_equals_the_two_apart(
    rows, dim, dtype, reduction, weight, loss_weight, seed
):
    """Values, loss and gradient bit for bit, the loss used in backward or not."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, dim, generator=gen, dtype=dtype) * 3
    codes = torch.randn(rows, dim, generator=gen, dtype=dtype)
    up = torch.randn(rows, dim, generator=gen, dtype=dtype)

    def fused(zz, c):
        return straight_through_loss(zz, c, weight, reduction)

    def apart(zz, c):
        return straight_through(zz, c), commitment_loss(zz, c, weight, False, reduction)

    for a, b in zip(_grads(fused, z, codes, up, loss_weight),
                    _grads(apart, z, codes, up, loss_weight), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("loss_weight", [None, 2.0])
def test_straight_through_loss_with_residual_terms_equals_the_two_apart(loss_weight):
    """Residual VQ's form: the loss from ``(sum_l r_l, sum_l |r_l|^2)``."""
    gen = torch.Generator().manual_seed(0)
    z, codes = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
    residual = (torch.randn(30, 8, generator=gen), torch.tensor(7.25))
    up = torch.randn(30, 8, generator=gen)

    def fused(zz, c):
        return straight_through_loss(zz, c, 0.25, "mean", residual)

    def apart(zz, c):
        return straight_through(zz, c), residual_commitment_loss(zz, *residual, 0.25)

    for a, b in zip(_grads(fused, z, codes, up, loss_weight),
                    _grads(apart, z, codes, up, loss_weight), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, **EXACT)


def test_straight_through_loss_unused_loss_leaves_an_infinite_residual_out():
    """Where only the output is used, a residual of inf adds nothing (not inf * 0)."""
    z = torch.tensor([[1.0, 2.0]], requires_grad=True)
    codes = torch.tensor([[float("inf"), 0.0]])
    out, _ = straight_through_loss(z, codes, 0.25)
    out[:, 1].sum().backward()
    assert torch.equal(z.grad, torch.tensor([[0.0, 1.0]]))


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 30),
    dim=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([1e-14, 1e-6, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_unit_rows_equals_normalize(rows, dim, dtype, scale, seed):
    """The values bit for bit; the gradient autograd's through F.normalize up to rounding,
    rows below eps (held by the clamp) and zero rows included."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen, dtype=dtype) * scale
    x[0] = 0.0
    up = torch.randn(rows, dim, generator=gen, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = unit_rows(xa), F.normalize(xb, dim=-1, eps=1e-12)
    torch.testing.assert_close(ya, yb, **EXACT)
    torch.testing.assert_close(ya, l2norm(x), **EXACT)
    ya.backward(up)
    yb.backward(up)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(xa.grad / xa.grad.abs().amax().clamp_min(1),
                               xb.grad / xa.grad.abs().amax().clamp_min(1), **tol)  # fmt: skip


def test_unit_rows_without_gradient_is_l2norm():
    x = torch.randn(5, 3)
    assert torch.equal(unit_rows(x), l2norm(x))
    assert unit_rows(x).grad_fn is None
