"""ReinMax (Liu et al. 2023) as GumbelQuantizer's estimator and the gumbel-reinmax preset.

The math is checked against the authors' package (``reinmax`` on PyPI, its autograd
Function fed the same logits and, by seeding, the same sample), against the paper's
Algorithm 2 transcribed in plain autograd, and against its closed form: with ``tau = 1``
the expectation over the sample of ReinMax's gradient is the exact gradient of
``E[f(D)]`` for a quadratic ``f``, where straight-through's is not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import stabq
from stabq import BottleneckClassifier, CodebookUsage, CollapseMonitor, ConfigError, TrainConfig
from stabq.quantizers import gumbel
from stabq.quantizers.gumbel import GumbelQuantizer, diversity_loss, gumbel_reinmax
from stabq.quantizers.reinmax import reinmax, reinmax_at

PROPS = settings(max_examples=40, derandomize=True, deadline=None)
ROW = st.lists(st.floats(-6, 6, width=32), min_size=2, max_size=9)
TAU = st.sampled_from([0.1, 0.5, 1.0, 1.3, 5.0])


def algorithm_2(logits, sample, tau):
    """The paper's Algorithm 2, line by line in plain autograd."""
    pi0 = logits.softmax(-1)
    pi1 = (sample + (logits / tau).softmax(-1)) / 2
    pi1 = ((pi1.log() - logits).detach() + logits).softmax(-1)
    pi2 = 2 * pi1 - pi0 / 2
    return pi2 - pi2.detach() + sample


def grad_of(fn, logits, upstream, *args):
    """``fn(logits, *args)`` and the gradient of ``sum(fn(...) * upstream)`` to ``logits``."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, *args)
    (grad,) = torch.autograd.grad((out * upstream).sum(), leaf)
    return out.detach(), grad


def one_hot_rows(index, k, dtype=torch.float32):
    return F.one_hot(torch.as_tensor(index), k).to(dtype)


def by_function(logits, sample, tau):
    """:func:`reinmax_at` called as :func:`reinmax` is: the sample's indices."""
    return reinmax_at(logits, sample.argmax(-1, keepdim=True), tau)


FORMS = {"plain": reinmax, "function": by_function}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [0.3, 1.0, 1.3, 4.0])
def test_forward_and_gradients_equal_the_authors_package(form, dtype, tau):
    ref = pytest.importorskip("reinmax")
    g = torch.Generator().manual_seed(int(tau * 10))
    logits = (3 * torch.randn(64, 12, generator=g)).to(dtype)
    upstream = torch.randn(64, 12, generator=g).to(dtype)
    leaf = logits.clone().requires_grad_(True)
    torch.manual_seed(0)  # the package draws its sample with torch.multinomial
    sample, _ = ref.reinmax(leaf, tau)
    (expected,) = torch.autograd.grad((sample * upstream).sum(), leaf)
    assert set(sample.sum(-1).tolist()) == {1.0} and sample.argmax(-1).unique().numel() > 1
    out, found = grad_of(FORMS[form], logits, upstream, sample.detach(), tau)
    assert torch.equal(out, sample.detach())  # exactly the sample
    eps, scale = torch.finfo(dtype).eps, float(upstream.abs().max())
    torch.testing.assert_close(found, expected, rtol=64 * eps, atol=64 * eps * scale)


@PROPS
@given(
    st.lists(ROW, min_size=1, max_size=6).filter(lambda r: len({len(x) for x in r}) == 1),
    TAU,
    st.sampled_from(list(FORMS)),
)
def test_gradients_equal_algorithm_2_and_rows_sum_to_zero(rows, tau, form):
    logits = torch.tensor(rows, dtype=torch.float64)
    g = torch.Generator().manual_seed(len(rows))
    index = torch.randint(0, logits.shape[1], (len(rows),), generator=g)
    sample = one_hot_rows(index, logits.shape[1], torch.float64)
    upstream = torch.randn(logits.shape, generator=g, dtype=torch.float64)
    out, found = grad_of(FORMS[form], logits, upstream, sample, tau)
    _, expected = grad_of(algorithm_2, logits, upstream, sample, tau)
    assert torch.equal(out, sample)
    torch.testing.assert_close(found, expected, rtol=1e-9, atol=1e-12)
    scale = float(upstream.abs().max()) * 3
    torch.testing.assert_close(found.sum(-1), torch.zeros(len(rows), dtype=found.dtype),
                               rtol=0, atol=1e-12 * scale)  # fmt: skip


@PROPS
@given(st.integers(1, 50), st.integers(2, 50), st.floats(0.05, 20), st.integers(0, 2**16))
def test_the_function_equals_the_plain_form_in_float32(n, k, tau, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 5 * torch.randn(n, k, generator=g)
    sample = one_hot_rows(torch.randint(0, k, (n,), generator=g), k)
    upstream = torch.randn(n, k, generator=g)
    out, found = grad_of(by_function, logits, upstream, sample, tau)
    expected_out, expected = grad_of(reinmax, logits, upstream, sample, tau)
    assert torch.equal(out, expected_out)
    scale = float(upstream.abs().max())
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6 * scale)


def test_the_functions_gradient_is_not_differentiated_again():
    logits = torch.randn(3, 4, requires_grad=True)
    out = reinmax_at(logits, torch.tensor([[0], [1], [3]]), 1.0)
    (grad,) = torch.autograd.grad((out * torch.randn(3, 4)).sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):  # not silently wrong
        grad.sum().backward()


@PROPS
@given(st.integers(2, 7), st.integers(0, 2**16))
def test_expected_gradient_is_exact_for_a_quadratic_loss_at_tau_1(k, seed):
    g = torch.Generator().manual_seed(seed)
    theta = 2 * torch.randn(k, generator=g, dtype=torch.float64)
    a = torch.randn(k, k, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64)

    def f(d):  # a quadratic loss of the one-hot sample d
        return d @ a @ d + b @ d

    eye = torch.eye(k, dtype=torch.float64)
    exact = torch.autograd.functional.jacobian(
        lambda t: t.softmax(-1) @ torch.stack([f(e) for e in eye]), theta
    )
    estimate = torch.zeros(k, dtype=torch.float64)
    for i, d in enumerate(eye):  # the expectation over the sample, exactly
        upstream = torch.autograd.functional.jacobian(f, d)
        _, grad = grad_of(reinmax, theta, upstream, d, 1.0)
        estimate += theta.softmax(-1)[i] * grad
    torch.testing.assert_close(estimate, exact, rtol=1e-9, atol=1e-12)


def test_straight_through_misses_the_quadratic_case_reinmax_gets():
    theta = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    a = torch.tensor([[0.0, 2.0, -1.0], [1.0, 3.0, 0.0], [0.5, -2.0, 1.0]], dtype=torch.float64)
    p0, eye = theta.softmax(-1), torch.eye(3, dtype=torch.float64)
    jacobian = torch.diag(p0) - torch.outer(p0, p0)
    exact = jacobian @ torch.diagonal(a)
    through = sum(p0[i] * (jacobian @ ((a + a.T) @ d)) for i, d in enumerate(eye))
    assert float((through - exact).abs().max()) > 0.05  # the comparison above can fail


@PROPS
@given(st.permutations(range(6)), st.integers(0, 100))
def test_sample_at_the_argmax_and_tiny_tau_halve_and_negate_straight_through(order, seed):
    # pi1 = D exactly, J(D) = 0: what is left is -J(pi0) g / 2
    logits = torch.tensor(order, dtype=torch.float64) * 0.5
    sample = one_hot_rows(int(logits.argmax()), 6, torch.float64)
    upstream = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _, found = grad_of(reinmax, logits, upstream, sample, 1e-4)
    _, through = grad_of(lambda t: t.softmax(-1), logits, upstream)
    torch.testing.assert_close(found, -0.5 * through, rtol=1e-12, atol=1e-15)


@PROPS
@given(st.integers(1, 40), st.integers(2, 40), st.floats(0.05, 10), st.integers(0, 2**16))
def test_training_rows_are_one_hot_draws_and_quantized_is_a_code(n, k, tau, seed):
    torch.manual_seed(seed)
    logits = 4 * torch.randn(n, k)
    out = gumbel_reinmax(logits, tau)
    assert torch.equal(out, F.one_hot(out.argmax(-1), k).float())
    q = GumbelQuantizer(5, k, estimator="reinmax")
    quantized, indices, _ = q(torch.randn(n, 5))
    assert torch.equal(quantized, q.embed[indices])


def test_the_sample_is_gumbel_max_of_the_logits_whatever_tau():
    logits = torch.randn(300, 7)
    for tau in (0.1, 1.0, 9.0):
        g = torch.Generator().manual_seed(3)
        noise = gumbel.gumbel_noise(logits, torch.Generator().manual_seed(3))
        found = gumbel_reinmax(logits, tau, g).argmax(-1)
        assert torch.equal(found, (logits + noise).argmax(-1))


@pytest.mark.parametrize("bad", ["Reinmax", "straight-through", None, 1])
def test_a_bad_estimator_is_one_config_error_line(bad):
    with pytest.raises(ConfigError, match=r"estimator=.*allowed is one of softmax, reinmax"):
        GumbelQuantizer(8, estimator=bad)
    with pytest.raises(ConfigError, match="estimator"):
        stabq.build_quantizer("gumbel", 8, estimator=bad)


def test_the_preset_builds_what_the_table_says():
    q = stabq.build_quantizer("gumbel-reinmax", 16)
    assert type(q) is GumbelQuantizer and q.estimator == "reinmax" and q.codebook_size == 32
    assert q.pre_norm is not None and q.diversity_weight == 1.0 and q.kl_weight == 0.0
    q.set_progress(1.0)
    assert q.tau == 16.0 and "estimator='reinmax'" in repr(q)
    assert stabq.build_quantizer("gumbel", 16).estimator == "softmax"
    monitor = CollapseMonitor(q)
    assert (monitor.codebook_size, monitor.num_codebooks, monitor.levels) == (32, 1, None)
    monitor.detach()


def test_usage_counts_the_preset_indices():
    torch.manual_seed(0)
    q = stabq.build_quantizer("gumbel-reinmax", 16)
    q(torch.randn(256, 16))  # a training batch: the running statistics move
    usage = CodebookUsage.for_quantizer(q.eval())
    indices = q(torch.randn(64, 16)).indices
    usage.update(indices)
    found = usage.compute()["per_codebook"][0]
    distinct = indices.unique().numel()
    assert found["usage"] == pytest.approx(distinct / 32) and distinct > 1
    assert found["dead_codes"] == 32 - distinct


def test_diversity_loss_is_the_gumbel_presets_and_syncs_in_distributed_training(monkeypatch):
    torch.manual_seed(0)
    q = stabq.build_quantizer("gumbel-reinmax", 6)
    x = torch.randn(20, 6)
    logits = q.to_logits(F.batch_norm(x, None, None, training=True)).float()
    expected = diversity_loss(logits)
    torch.testing.assert_close(q(x).loss, expected)  # diversity weight 1.0
    reduced = []
    monkeypatch.setattr(stabq.distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(stabq.distributed, "sum_over_ranks", lambda t: reduced.append(t) or t)
    torch.testing.assert_close(q(x).loss, expected)  # one rank: the same loss, all-reduced
    sums = [t for t in reduced if t.shape == (33,)]  # 32 codes' softmax sums and the rows
    assert len(sums) == 1 and float(sums[0][-1].detach()) == 20
    torch.testing.assert_close(sums[0][:-1], logits.softmax(-1).sum(0))


@pytest.mark.parametrize("k", [6, 7, 32, 45])
def test_the_diversity_loss_is_never_negative_at_even_use(k):
    # exp H(pbar) rounds to a little above K for these K (e.g. -2.4e-7 at 32 without the clamp)
    assert float(diversity_loss(torch.zeros(3, k))) == 0.0
    q = stabq.build_quantizer("gumbel-reinmax", 4, codebook_size=k)
    torch.nn.init.zeros_(q.to_logits.weight)
    assert float(q(torch.randn(3, 4)).loss.detach()) == 0.0


def test_a_few_training_steps_stay_finite_and_train_the_logits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    model = BottleneckClassifier(12, 2, quantizer="gumbel-reinmax", hidden=32)
    before = model.quantizer.to_logits.weight.detach().clone()
    result = stabq.train(model, (x, y), config=TrainConfig(epochs=2, batch_size=32))
    for epoch in result.history:
        assert all(math.isfinite(v) for v in epoch.values() if isinstance(v, float))
    assert not torch.equal(model.quantizer.to_logits.weight, before)
    logits, out = model.eval()(torch.from_numpy(x))
    assert torch.isfinite(logits).all() and (out.indices >= 0).all()


def test_swap_quantizers_puts_the_preset_in_and_the_users_loop_trains():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), vqp.VectorQuantize(dim=8, codebook_size=16))
    report = stabq.swap_quantizers(model, "gumbel-reinmax")
    assert [s.preset for s in report] == ["gumbel-reinmax"]
    swapped = model[1]
    quantized, indices, loss = swapped(model[0](torch.randn(4, 6, 5)))  # vqp's (q, idx, loss)
    assert quantized.shape == (4, 6, 8) and indices.shape == (4, 6)
    (quantized.sum() + loss).backward()
    assert model[0].weight.grad.abs().sum() > 0  # gradients reach the encoder


def test_compiled_reinmax_equals_eager():
    logits = 2 * torch.randn(16, 9)
    sample = one_hot_rows(torch.randint(0, 9, (16,)), 9)
    upstream = torch.randn(16, 9)
    compiled = torch.compile(reinmax, backend="aot_eager", fullgraph=True)
    out, found = grad_of(compiled, logits, upstream, sample, 1.3)
    _, expected = grad_of(reinmax, logits, upstream, sample, 1.3)
    assert torch.equal(out, sample)
    torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-7)
    q = GumbelQuantizer(4, 8, estimator="reinmax", anneal_steps=10)
    quantized, indices, _ = torch.compile(q, backend="aot_eager")(torch.randn(30, 4))
    assert torch.equal(quantized, q.embed[indices].detach()) and int(q.anneal_step) == 1


@pytest.mark.parametrize("name", ["gumbel", "gumbel-reinmax"])
def test_the_noise_compiles_for_a_batch_size_that_varies(name):
    q = stabq.build_quantizer(name, 4)
    compiled = torch.compile(q, backend="aot_eager", dynamic=True)
    for rows in (7, 12):  # a symbolic batch size (torch.rand with it failed to trace)
        quantized, indices, loss = compiled(torch.randn(rows, 4))
        assert quantized.shape == (rows, 4) and indices.shape == (rows,)
        assert torch.isfinite(loss)
