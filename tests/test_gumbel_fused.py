"""The Gumbel quantizer's fused training step (``stabq.quantizers.gumbel_fused``) against
the plain formulas written out here with autograd: the same noise from the same seed, the
same codes and indices, the same gradients to the input, the logits' weights and the codes,
block by block or in one block, in float32 and float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stabq import GumbelQuantizer
from stabq.quantizers import gumbel_fused


def plain_step(q: GumbelQuantizer, x: torch.Tensor, seed: int) -> tuple:
    """``q``'s training step in plain operations: codes, indices, loss."""
    logits = q.to_logits(x)
    torch.manual_seed(seed)
    u = torch.rand(logits.shape, dtype=logits.dtype)
    eps = torch.finfo(u.dtype).eps
    g = -torch.log(-torch.log(u.clamp(eps, 1 - eps)))
    if q.estimator == "reinmax":
        index = (logits + g).argmax(-1)
        sample = F.one_hot(index, q.codebook_size).to(logits.dtype)
        pi0 = logits.softmax(-1)
        pi1 = (sample + (logits / q.tau).softmax(-1)) / 2
        pi1 = ((pi1.log() - logits).detach() + logits).softmax(-1)
        pi2 = 2 * pi1 - pi0 / 2
        weights = pi2 - pi2.detach() + sample
    else:
        weights = ((logits + g) / q.tau).softmax(-1)
        index = weights.argmax(-1)
    loss = logits.new_zeros(())
    if q.kl_weight:
        log_p = logits.log_softmax(-1)
        loss = q.kl_weight * ((log_p.exp() * log_p).sum(-1).mean() + math.log(32))
    return weights @ q.embed, index, loss


def step(q: GumbelQuantizer, x: torch.Tensor, fn, seed: int, upstream: torch.Tensor):
    """Codes, indices and the gradients to ``x`` and every parameter of one step."""
    leaf = x.clone().requires_grad_()
    if fn is None:
        torch.manual_seed(seed)
        out = q(leaf)
        quantized, indices, loss = out.quantized, out.indices, out.loss
    else:
        quantized, indices, loss = fn(q, leaf, seed)
    q.zero_grad()
    ((quantized * upstream).sum() + loss).backward()
    return quantized.detach(), indices, leaf.grad, *(p.grad for p in q.parameters())


@pytest.mark.parametrize("estimator", ["softmax", "reinmax"])
@pytest.mark.parametrize("kl_weight", [0.0, 0.5])  # 0: the step writes over the logits
@pytest.mark.parametrize("block", [None, 100])  # entries a block: every row at once; 3 rows
def test_the_quantizers_step_equals_the_plain_formulas(estimator, kl_weight, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(gumbel_fused, "BLOCK_ELEMENTS", block)
    torch.manual_seed(0)
    q = GumbelQuantizer(16, 32, tau_start=0.7, kl_weight=kl_weight, estimator=estimator).train()
    gen = torch.Generator().manual_seed(1)
    x, upstream = torch.randn(301, 16, generator=gen), torch.randn(301, 16, generator=gen)
    ours = step(q, x, None, 5, upstream)
    ref = step(q, x, plain_step, 5, upstream)
    assert torch.equal(ours[1], ref[1])  # indices
    if estimator == "softmax":
        assert torch.equal(ours[0], ref[0])  # the same operations forward
    for a, b in zip(ours[0:1] + ours[2:], ref[0:1] + ref[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def plain_mixture(logits, embed, tau, estimator, seed):
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=logits.dtype)
    eps = torch.finfo(u.dtype).eps
    g = -torch.log(-torch.log(u.clamp(eps, 1 - eps)))
    if estimator == "softmax":
        weights = ((logits + g) / tau).softmax(-1)
        return weights @ embed, weights.argmax(-1)
    index = (logits + g).argmax(-1)
    sample = F.one_hot(index, logits.shape[-1]).to(logits.dtype)
    pi1 = ((sample + (logits / tau).softmax(-1)) / 2).detach()
    through_pi1 = pi1 * (logits - (pi1 * logits).sum(-1, keepdim=True))  # Jacobian J(pi1)
    pi2 = 2 * through_pi1 - logits.softmax(-1) / 2
    return (pi2 - pi2.detach() + sample) @ embed, index


@pytest.mark.parametrize("estimator", ["softmax", "reinmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [None, 100])
def test_the_mixtures_equal_the_plain_formulas(estimator, dtype, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(gumbel_fused, "BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(203, 37, generator=gen, dtype=dtype) * 3
    embed = torch.randn(37, 5, generator=gen, dtype=dtype)
    upstream = torch.randn(203, 5, generator=gen, dtype=dtype)
    fused = {"softmax": gumbel_fused.soft_mixture, "reinmax": gumbel_fused.reinmax_mixture}
    results = []
    for mix in (
        lambda lg, e: plain_mixture(lg, e, 0.6, estimator, 7),
        lambda lg, e: fused[estimator](lg * 1.0, e, 0.6, torch.Generator().manual_seed(7), True),
    ):
        lg, e = logits.clone().requires_grad_(), embed.clone().requires_grad_()
        quantized, indices = mix(lg, e)
        (quantized * upstream).sum().backward()
        results.append((quantized.detach(), indices, lg.grad, e.grad))
    ref, ours = results
    assert torch.equal(ours[1], ref[1])
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    for a, b in zip(ours[0:1] + ours[2:], ref[0:1] + ref[2:], strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_a_generator_drawn_block_by_block_gives_the_noise_of_one_draw(monkeypatch):
    monkeypatch.setattr(gumbel_fused, "BLOCK_ELEMENTS", 50)
    logits = torch.randn(97, 13, generator=torch.Generator().manual_seed(0)) * 3
    u = torch.rand(97, 13, generator=torch.Generator().manual_seed(4))
    eps = torch.finfo(u.dtype).eps
    expected = (logits - torch.log(-torch.log(u.clamp(eps, 1 - eps)))).argmax(-1, keepdim=True)
    found = gumbel_fused.noisy_argmax(logits, torch.Generator().manual_seed(4))
    assert torch.equal(found, expected)
    assert len(gumbel_fused.blocks(97, 13, logits.device)) == 33  # 3 rows a block
    batched = gumbel_fused.noisy_argmax(logits.reshape(1, 97, 13), torch.Generator().manual_seed(4))
    assert torch.equal(batched, expected[None])


@pytest.mark.parametrize("estimator", ["softmax", "reinmax"])
def test_a_kept_graph_gives_the_same_gradients_again(estimator):
    """The step writes its gradient over buffers it owns only when the graph is done with."""
    q = GumbelQuantizer(8, 16, estimator=estimator).train()
    x = torch.randn(40, 8)
    out = q(x)
    loss = (out.quantized * torch.randn(40, 8)).sum()
    first = torch.autograd.grad(loss, list(q.parameters()), retain_graph=True)
    again = torch.autograd.grad(loss, list(q.parameters()))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("estimator", ["softmax", "reinmax"])
def test_no_rows_give_no_codes_and_zero_gradients(estimator):
    q = GumbelQuantizer(8, 16, estimator=estimator).train()
    x = torch.randn(0, 8, requires_grad=True)
    out = q(x)
    out.quantized.sum().backward()
    assert out.quantized.shape == (0, 8) and out.indices.shape == (0,)
    assert torch.equal(q.embed.grad, torch.zeros_like(q.embed))
