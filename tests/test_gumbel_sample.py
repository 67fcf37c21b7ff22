"""Gumbel-Softmax's in-place sampler (``stabq.quantizers.gumbel._NoisySoftmax``) against
autograd through the plain formula ``softmax((logits + g) / tau)``: the same values and
gradients bit for bit, and what it may overwrite, only where no one reads it again."""

from __future__ import annotations

import pytest
import torch

from stabq import GumbelQuantizer
from stabq.quantizers.gumbel import _sample, diversity_loss, gumbel_noise, gumbel_softmax


def plain(logits: torch.Tensor, tau: float, hard: bool, seed: int) -> torch.Tensor:
    y = ((gumbel_noise(logits, torch.Generator().manual_seed(seed)) + logits) / tau).softmax(-1)
    if not hard:
        return y
    y_hard = torch.nn.functional.one_hot(y.detach().argmax(-1), logits.shape[-1]).to(y.dtype)
    return y_hard - y.detach() + y


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_sample_and_its_gradient_are_autograds_through_the_plain_formula(hard, reuse, dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, 37, generator=gen) * 3).to(dtype)
    weight = torch.randn(300, 37, generator=gen).to(dtype)
    results = []
    for sample in (
        lambda x: plain(x, 0.7, hard, 1),
        lambda x: _sample(x, 0.7, hard, torch.Generator().manual_seed(1), reuse),
    ):
        x = logits.clone().requires_grad_()
        y = sample(x)
        values = y.detach().clone()
        (y * weight).sum().backward()
        results.append((values, x.grad))
    (ref_y, ref_grad), (y, grad) = results
    assert torch.equal(y, ref_y)
    assert torch.equal(grad, ref_grad)


def test_a_kept_graph_gives_the_same_gradient_again():
    logits = torch.randn(64, 10).requires_grad_()
    weight = torch.randn(64, 10)
    y = _sample(logits, 0.5, False, torch.Generator().manual_seed(2), reuse=True)
    (first,) = torch.autograd.grad((y * weight).sum(), logits, retain_graph=True)
    (again,) = torch.autograd.grad((y * weight).sum(), logits, create_graph=True)
    assert torch.equal(first, again)


def test_the_public_sampler_leaves_its_sample_intact_and_reuse_would_not():
    """``gumbel_softmax`` hands its sample to the caller, who may read it after backward: it
    must stay as it was. Must fail with ``reuse=True``, which writes the gradient over it
    (only the quantizer, which never reads its weights again, asks for that)."""
    logits = torch.randn(64, 10).requires_grad_()
    weight = torch.randn(64, 10)
    for reuse in (False, True):
        y = _sample(logits, 0.5, False, torch.Generator().manual_seed(3), reuse)
        before = y.detach().clone()
        (y * weight).sum().backward()
        assert torch.equal(y.detach(), before) != reuse
    y = gumbel_softmax(logits, 0.5, generator=torch.Generator().manual_seed(3))
    before = y.detach().clone()
    (y * weight).sum().backward()
    assert torch.equal(y.detach(), before)


@pytest.mark.parametrize("hard", [False, True])
def test_the_quantizers_step_equals_the_plain_formulas(hard):
    """A training step of the quantizer (diversity loss on) gives autograd's gradients through
    ``softmax((W x + b + g) / tau) E`` for the same noise, to every parameter and the input."""
    torch.manual_seed(4)
    q = GumbelQuantizer(16, 24, hard=hard, pre_norm=False, diversity_weight=0.5).train()
    q.set_progress(0.3)
    x = torch.randn(200, 16)
    grads = []
    for ours in (True, False):
        q.zero_grad()
        xx = x.clone().requires_grad_()
        torch.manual_seed(5)
        if ours:
            out = q(xx)
            loss = (out.quantized * x).sum() + out.loss
        else:
            logits = q.to_logits(xx)
            noise = gumbel_noise(logits)  # the same draw: the global generator, seed 5
            y = ((noise + logits) / q.tau).softmax(-1)
            if hard:
                y_hard = torch.nn.functional.one_hot(y.detach().argmax(-1), 24).float()
                y = y_hard - y.detach() + y
            loss = ((y @ q.embed) * x).sum() + 0.5 * diversity_loss(logits)
        loss.backward()
        grads.append([xx.grad, *(p.grad.clone() for p in q.parameters())])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
