"""GumbelQuantizer: the tau schedule, eval argmax, soft and hard samples, the KL loss, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from stabq import ConfigError, GumbelQuantizer
from stabq.quantizers.gumbel import (
    diversity_loss,
    gumbel_from_uniform,
    gumbel_noise,
    gumbel_softmax,
)

PAIRS = [(5.0, 0.1), (1.0, 0.5), (2.0, 2.0), (10.0, 1e-3), (0.7, 0.3), (3, 0.25), (100.0, 0.01)]


def identity_embed(k: int, **kw) -> GumbelQuantizer:
    """A quantizer whose code table is eye(K), so ``quantized`` IS the weight vector."""
    q = GumbelQuantizer(k, codebook_size=k, **kw)
    with torch.no_grad():
        q.embed.copy_(torch.eye(k))
    return q


def test_noise_has_the_gumbel_distribution():
    """Kolmogorov-Smirnov against the Gumbel(0, 1) CDF on 200,000 draws at a fixed seed;
    the same test refuses the noise shifted by 0.02 or scaled by 1.02 (it has the power)."""
    g = gumbel_noise(torch.empty(200_000), torch.Generator().manual_seed(0)).double().numpy()
    assert stats.kstest(g, stats.gumbel_r.cdf).pvalue > 1e-3
    assert stats.kstest(g + 0.02, stats.gumbel_r.cdf).pvalue < 1e-6
    assert stats.kstest(g * 1.02, stats.gumbel_r.cdf).pvalue < 1e-6
    assert abs(g.mean() - 0.5772156649) < 0.01  # Euler-Mascheroni
    assert abs(g.var() - math.pi**2 / 6) < 0.03


def test_argmax_of_logits_plus_noise_samples_the_softmax():
    """The Gumbel-max trick: argmax(logits + g) picks code k with probability softmax(logits)_k
    (chi-square on 200,000 rows at a fixed seed; softmax(1.1 * logits) is refused)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -4.0])
    rows = logits.expand(200_000, -1)
    picks = (rows + gumbel_noise(rows, torch.Generator().manual_seed(1))).argmax(-1)
    counts = torch.bincount(picks, minlength=8).double().numpy()
    for scale, passes in ((1.0, True), (1.1, False)):
        expected = (scale * logits).double().softmax(-1).numpy() * len(rows)
        p = stats.chisquare(counts, expected).pvalue
        assert (p > 1e-3) if passes else (p < 1e-6), (scale, p)


def test_noise_is_finite_at_the_extremes_of_u():
    """u = 0, 1, and values closer to them than eps are clamped: g is finite, in float16,
    bfloat16, float32 and float64 alike; inside [eps, 1 - eps] it is exactly -log(-log u)."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        tiny = torch.finfo(dtype).tiny
        u = torch.tensor([0.0, tiny, eps / 2, eps, 0.5, 1 - eps, 1 - eps / 4, 1.0], dtype=dtype)
        g = gumbel_from_uniform(u.clone())
        assert torch.isfinite(g).all(), (dtype, g)
        assert (g.diff() >= 0).all(), (dtype, g)  # monotone in u, clamped ends flat
        inner = u[3:6]
        assert torch.equal(g[3:6], -(-inner.log()).log()), dtype
    g = gumbel_noise(torch.empty(100_000, dtype=torch.float16), torch.Generator().manual_seed(2))
    assert torch.isfinite(g).all()


def test_sampling_follows_the_generator_and_the_global_seed():
    """A generator fixes the noise; without one the global RNG does (torch.manual_seed)."""
    logits = torch.randn(50, 9)
    draw = [gumbel_softmax(logits, 1.0, generator=torch.Generator().manual_seed(3)) for _ in "ab"]
    assert torch.equal(*draw)
    torch.manual_seed(4)
    a = gumbel_noise(logits)
    torch.manual_seed(4)
    assert torch.equal(a, gumbel_noise(logits))
    assert not torch.equal(a, gumbel_noise(logits))


def test_hard_sample_is_straight_through_the_soft_one():
    """hard=True: forward is one_hot(argmax soft sample), backward the soft sample's gradient."""
    logits = torch.randn(40, 7, requires_grad=True)
    r = torch.randn(40, 7)
    grads, outs = [], []
    for hard in (False, True):
        y = gumbel_softmax(logits, 0.7, hard, torch.Generator().manual_seed(5))
        (g,) = torch.autograd.grad((y * r).sum(), logits)
        grads.append(g)
        outs.append(y.detach())
    soft, hard = outs
    assert torch.equal(hard, torch.nn.functional.one_hot(soft.argmax(-1), 7).float())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("start", "end"), PAIRS)
def test_tau_end_points_are_exact(start, end):
    """tau == tau_start at progress 0 and == tau_end at progress 1, with ==, not approx."""
    q = GumbelQuantizer(4, 8, tau_start=start, tau_end=end)
    assert q.tau == start  # before any set_progress, progress is 0
    q.set_progress(1.0)
    assert q.tau == end
    q.set_progress(0.0)
    assert q.tau == start
    q.set_progress(1)  # an int progress is a number too
    assert q.tau == end


@pytest.mark.parametrize(("start", "end"), PAIRS)
def test_tau_midpoint_is_geometric_mean_and_decreases(start, end):
    """Exponential schedule: tau(0.5) = sqrt(start * end); strictly decreasing when start > end."""
    q = GumbelQuantizer(4, 8, tau_start=start, tau_end=end)
    q.set_progress(0.5)
    assert abs(q.tau - math.sqrt(start * end)) <= 1e-12 * max(1.0, math.sqrt(start * end))
    taus = []
    for i in range(11):
        q.set_progress(i / 10)
        taus.append(q.tau)
    if start > end:
        assert all(b < a for a, b in itertools.pairwise(taus)), taus
    else:
        assert all(t == pytest.approx(start, rel=1e-12) for t in taus)


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(1e-3, 1e3),
    end=st.floats(1e-3, 1e3),
    progress=st.floats(0.0, 1.0),
)
def test_log_tau_is_linear_in_progress(start, end, progress):
    """log tau(p) = (1 - p) log tau_start + p log tau_end, for any positive pair."""
    q = GumbelQuantizer(3, 4, tau_start=start, tau_end=end)
    q.set_progress(progress)
    expected = (1 - progress) * math.log(start) + progress * math.log(end)
    assert abs(math.log(q.tau) - expected) <= 1e-12 * max(1.0, abs(expected))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    dim=st.integers(1, 8),
    k=st.integers(1, 16),
    lead=st.sampled_from([(9,), (1,), (2, 5), (3, 1)]),
)
def test_eval_picks_the_argmax_code_exactly(seed, dim, k, lead):
    """Eval: indices = argmax to_logits(x); quantized is exactly that row of the code table."""
    torch.manual_seed(seed)
    q = GumbelQuantizer(dim, codebook_size=k).eval()
    x = torch.randn(*lead, dim)
    out = q(x)
    expected = q.to_logits(x).argmax(-1)
    assert out.indices.shape == lead and out.indices.dtype == torch.int64
    assert torch.equal(out.indices, expected)
    assert torch.equal(out.quantized, q.embed.detach()[expected])
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized.detach())
    again = q(x)  # no sampling in eval: the same answer every call
    assert torch.equal(again.quantized, out.quantized) and torch.equal(again.indices, out.indices)


def test_eval_weights_are_one_hot():
    """With an identity code table, eval output is a one-hot row at the argmax."""
    torch.manual_seed(1)
    q = identity_embed(6).eval()
    x = torch.randn(30, 6)
    w = q(x).quantized
    assert torch.equal(w, torch.nn.functional.one_hot(q.to_logits(x).argmax(-1), 6).float())


def test_training_soft_samples_sum_to_one_are_not_one_hot_and_are_random():
    """hard=False in training: rows are probability vectors, not one-hot, resampled each call."""
    torch.manual_seed(2)
    q = identity_embed(8, hard=False).train()
    x = torch.randn(64, 8)
    a, b = q(x), q(x)
    torch.testing.assert_close(a.quantized.sum(-1), torch.ones(64), rtol=0, atol=1e-5)
    assert (a.quantized >= 0).all()
    assert (a.quantized.amax(-1) < 0.999).all()  # tau = 5: nothing close to one-hot
    assert ((a.quantized > 0) & (a.quantized < 1)).any(-1).all()
    assert not torch.equal(a.quantized, b.quantized)
    assert torch.equal(a.indices, a.quantized.argmax(-1))


def test_training_hard_samples_are_exactly_one_hot_and_pass_gradients():
    """hard=True in training: exact one-hot rows; gradients still reach to_logits."""
    torch.manual_seed(3)
    q = identity_embed(8, hard=True).train()
    x = torch.randn(64, 8)
    out = q(x)
    w = out.quantized
    assert ((w == 0) | (w == 1)).all()
    assert torch.equal(w.sum(-1), torch.ones(64))
    assert torch.equal(out.indices, w.argmax(-1))
    (w * torch.randn(64, 8)).sum().backward()
    assert q.to_logits.weight.grad is not None
    assert q.to_logits.weight.grad.abs().sum() > 0


def test_soft_training_passes_gradients_to_logits_and_codes():
    """hard=False: the soft sample is differentiable in the logits and the code table."""
    torch.manual_seed(4)
    q = GumbelQuantizer(5, codebook_size=7).train()
    x = torch.randn(20, 5, requires_grad=True)
    q(x).quantized.square().sum().backward()
    assert q.to_logits.weight.grad.abs().sum() > 0
    assert q.embed.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_lower_tau_gives_samples_closer_to_one_hot():
    """Same Gumbel noise, tau 5.0 vs 0.1: every row's max weight grows; the mean does clearly."""
    q = identity_embed(16, tau_start=5.0, tau_end=0.1).train()
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    hot = q(x)
    q.set_progress(1.0)
    torch.manual_seed(0)
    cold = q(x)
    assert torch.equal(hot.indices, cold.indices)  # same noise, same argmax
    assert (cold.quantized.amax(-1) >= hot.quantized.amax(-1) - 1e-6).all()
    assert cold.quantized.amax(-1).mean() > 0.9 > 0.5 > hot.quantized.amax(-1).mean()


@pytest.mark.parametrize("kl_weight", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("training", [False, True])
def test_kl_loss_equals_hand_computation(kl_weight, training):
    """loss = kl_weight * mean over rows of (sum_k p log p + log K), p = softmax(logits)."""
    torch.manual_seed(6)
    q = GumbelQuantizer(6, codebook_size=10, kl_weight=kl_weight).train(training)
    with torch.no_grad():
        q.to_logits.weight.mul_(3.0)  # peaked logits: far from uniform
    x = torch.randn(4, 7, 6)
    out = q(x)
    logits = q.to_logits(x).detach().double().reshape(-1, 10)
    p = logits.softmax(-1)
    expected = kl_weight * ((p * p.log()).sum(-1) + math.log(10)).mean()
    assert out.loss.dim() == 0
    assert expected > 0.05
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_kl_loss_is_zero_without_weight_and_near_zero_for_uniform_logits():
    """kl_weight=0 gives an exact 0; uniform logits give KL ~ 0 for any kl_weight."""
    torch.manual_seed(7)
    x = torch.randn(32, 6)
    assert GumbelQuantizer(6, 10)(x).loss.item() == 0.0
    q = GumbelQuantizer(6, 10, kl_weight=3.0)
    with torch.no_grad():
        q.to_logits.weight.zero_()
        q.to_logits.bias.zero_()
    assert abs(q(x).loss.item()) < 1e-6


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 20.0))
def test_kl_loss_is_never_negative(seed, scale):
    """KL to uniform is >= 0 whatever the logits (up to float rounding)."""
    torch.manual_seed(seed)
    q = GumbelQuantizer(4, 9, kl_weight=1.0)
    with torch.no_grad():
        q.to_logits.weight.mul_(scale)
    assert q(torch.randn(16, 4)).loss.item() >= -1e-6


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), -1])
def test_set_progress_outside_unit_interval_is_rejected(bad):
    """Progress outside [0, 1] raises ConfigError naming 'progress' and the value; tau unchanged."""
    q = GumbelQuantizer(4, 8)
    q.set_progress(0.25)
    before = q.tau
    with pytest.raises(ConfigError) as info:
        q.set_progress(bad)
    assert "progress" in str(info.value) and repr(bad) in str(info.value)
    assert q.tau == before


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tau_start": 0.0}, "tau_start"),
        ({"tau_start": -1.0}, "tau_start"),
        ({"tau_end": 0.0}, "tau_end"),
        ({"codebook_size": 0}, "codebook_size"),
        ({"codebook_size": -4}, "codebook_size"),
        ({"kl_weight": -0.1}, "kl_weight"),
        ({"diversity_weight": -1.0}, "diversity_weight"),
        ({"diversity_weight": float("nan")}, "diversity_weight"),
    ],
)
def test_bad_constructor_arguments_are_rejected(kwargs, name):
    """Non-positive temperatures, empty codebooks and negative kl_weight raise ConfigError."""
    with pytest.raises(ConfigError, match=name):
        GumbelQuantizer(4, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(10, 5), (2, 3, 5)])
def test_half_precision_input_is_accepted(dtype, shape):
    """Half input: output in the input's dtype and shape; eval codes as for the upcast input."""
    torch.manual_seed(8)
    q = GumbelQuantizer(5, 12).eval()
    x = torch.randn(*shape).to(dtype)
    out = q(x)
    ref = q(x.float())
    assert out.quantized.dtype == dtype and out.quantized.shape == x.shape
    assert out.indices.shape == shape[:-1]
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.quantized, ref.quantized.to(dtype))
    train_out = q.train()(x)
    assert train_out.quantized.dtype == dtype and train_out.quantized.shape == x.shape


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 40),
    k=st.integers(2, 24),
    scale=st.floats(0.0, 30.0),
)
def test_diversity_loss_equals_the_brute_force_perplexity_gap(seed, rows, k, scale):
    """(K - exp H(pbar)) / K with pbar the float64 batch mean of softmax(logits), in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, k, generator=g, dtype=torch.float64) * scale
    pbar = torch.stack([torch.softmax(row, 0) for row in logits]).mean(0)
    entropy = -sum(float(p) * math.log(float(p)) for p in pbar if p > 0)
    expected = (k - math.exp(entropy)) / k
    found = float(diversity_loss(logits))
    assert found == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert -1e-12 <= found < 1.0


def test_diversity_loss_is_zero_for_even_use_and_near_one_minus_1_over_k_for_one_code():
    k = 16
    even = torch.eye(k).repeat(3, 1) * 50  # every code equally often, sharply
    one = torch.zeros(30, k)
    one[:, 3] = 60.0
    assert float(diversity_loss(even)) == pytest.approx(0.0, abs=1e-6)
    assert float(diversity_loss(one)) == pytest.approx((k - 1) / k, abs=1e-6)
    assert float(diversity_loss(torch.zeros(0, k))) == 0.0


def test_diversity_weight_adds_the_loss_in_training_only_and_pushes_towards_even_use():
    torch.manual_seed(3)
    x = torch.randn(64, 6)
    q = GumbelQuantizer(6, codebook_size=8, diversity_weight=2.0)
    with torch.no_grad():
        q.to_logits.bias.copy_(torch.arange(8.0) * 3)  # one code dominates
    out = q.train()(x)
    logits = q.to_logits(x)
    torch.testing.assert_close(out.loss, 2.0 * diversity_loss(logits))
    assert float(out.loss) > 1.0
    assert float(q.eval()(x).loss) == 0.0  # no diversity term at eval
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    for _ in range(50):
        opt.zero_grad()
        q(x).loss.backward()
        opt.step()
    assert float(diversity_loss(q.to_logits(x))) < 0.8 * float(out.loss) / 2.0


def test_pre_norm_standardises_the_input_and_starts_with_unit_variance_logits():
    """pre_norm: logits of W (x - mean) / std with W ~ N(0, 1/dim), b = 0: the same logits
    for inputs shifted and scaled per feature, and a logit variance near 1."""
    torch.manual_seed(4)
    dim = 256
    q = GumbelQuantizer(dim, codebook_size=32, pre_norm=True).train()
    x = torch.randn(512, dim)
    shifted = x * torch.linspace(0.1, 50.0, dim) + 7.0
    logits = [q.to_logits(q.pre_norm(v)) for v in (x, shifted)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-3, atol=1e-3)
    assert float(q.to_logits.bias.abs().max()) == 0.0
    assert 0.8 < float(logits[0].var()) < 1.2
    plain = GumbelQuantizer(dim, codebook_size=32)  # nn.Linear's init: variance 1/3
    assert float(plain.to_logits(x).var()) < 0.5
    idx = q.eval()(shifted).indices  # eval: the running statistics, a valid code each
    assert idx.shape == (512,) and int(idx.max()) < 32
