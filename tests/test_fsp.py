"""FSP (finite scalar perturbation): against vector-quantize-pytorch's FSP with the same
weights, by properties of its bins, perturbation and moment loss, and through the preset
`fsp`, the classifier, the usage figures, the monitor and swap_quantizers."""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stabq
from stabq import FSP, BottleneckClassifier, CodebookUsage, CollapseMonitor, ConfigError
from stabq.quantizers import fsp as fsp_math

vqp = pytest.importorskip("vector_quantize_pytorch")

ACTIVATIONS = list(fsp_math.CDFS)
PROPERTY = settings(max_examples=30, derandomize=True, deadline=None)


def pair(levels, dim, act, inverse, rate, norm="kurt"):
    """The peer's FSP and stabq's with the same options and projection weights."""
    torch.manual_seed(0)
    peer = vqp.FSP(levels, dim=dim, act_name=act, quantize_rate=rate, need_inv_act=inverse,
                   vector_norm=norm)  # fmt: skip
    ours = FSP(levels, dim=dim, activation=act, quantize_rate=rate, inverse_activation=inverse,
               vector_norm=norm)  # fmt: skip
    ours.load_state_dict(peer.state_dict())
    return peer, ours


def run_both(peer, ours, x, seed=1):
    """Forward and backward of both on ``x`` with the RNG seeded alike: outputs, grads."""
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    found = []
    for module in (peer, ours):
        xi = x.clone().requires_grad_()
        torch.manual_seed(seed)
        out, indices, loss = module(xi)[:3]
        ((out * g).sum() + loss).backward()
        found.append((out.detach(), indices, loss.detach(), xi.grad))
    return found


MODES = [("eval", 0.0), ("train", 1.0), ("train", 0.3), ("train", 0.0)]


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("inverse", [False, True], ids=["rescale", "inverse"])
@pytest.mark.parametrize("mode,rate", MODES, ids=[f"{m}-{r}" for m, r in MODES])
def test_equals_the_peer_with_the_same_weights_and_draws(act, inverse, mode, rate):
    peer, ours = pair([8, 5, 5, 4], 12, act, inverse, rate)
    peer.train(mode == "train")
    ours.train(mode == "train")
    x = torch.randn(3, 40, 12, generator=torch.Generator().manual_seed(3)) * 2
    (p_out, p_idx, p_loss, p_grad), (o_out, o_idx, o_loss, o_grad) = run_both(peer, ours, x)
    assert p_idx.dtype == torch.int32 and o_idx.dtype == torch.int64  # a deliberate difference
    assert torch.equal(p_idx.long(), o_idx)
    # the same draws: equal up to the rounding of the peer's straight-through sums
    torch.testing.assert_close(o_out, p_out, rtol=0, atol=2e-6)
    assert o_loss.dtype == torch.float32 and o_loss.dim() == 0
    torch.testing.assert_close(o_loss, p_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(o_grad, p_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.indices_to_codes(o_idx), peer.indices_to_codes(p_idx), rtol=0, atol=2e-6
        )


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_without_projection_the_eval_codes_are_the_peers_bit_for_bit_in_the_rescaled_form(act):
    peer, ours = pair([7, 6, 3], None, act, False, 0.0, norm="var_tanh")
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        p_out, p_idx, p_loss, _ = peer.eval()(x)
        out = ours.eval()(x)
    assert torch.equal(out.indices, p_idx.long())
    decoded = ours.indices_to_codes(out.indices)
    assert torch.equal(decoded, out.quantized)  # stabq: the code exactly
    torch.testing.assert_close(out.quantized, p_out, rtol=0, atol=2e-7)
    torch.testing.assert_close(out.loss, p_loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(fsp_math.MOMENT_TARGETS))
def test_moment_loss_equals_the_peers_vector_norm(name):
    z = torch.randn(64, 5, generator=torch.Generator().manual_seed(5)) * 1.7 + 0.3
    z = z + z.pow(2) * 0.2  # skewed, so every moment differs from its target
    expected, _ = vqp.finite_scalar_perturbation.VectorNorm.build(name)(z)
    found = fsp_math.moment_loss(z, name)
    torch.testing.assert_close(found, expected.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:var_mean")  # the peer on fewer than 2 rows
@pytest.mark.parametrize("rows", [0, 1])
def test_fewer_than_two_rows_give_a_zero_loss_where_the_peers_is_nan(rows):
    z = torch.randn(rows, 4, requires_grad=True)
    expected, _ = vqp.finite_scalar_perturbation.VectorNorm.build("kurt")(z)
    assert rows == 0 or math.isnan(float(expected.detach()))
    loss = fsp_math.moment_loss(z, "kurt")
    assert float(loss) == 0.0 and loss.dtype == torch.float32 and loss.dim() == 0


def test_the_moment_loss_stays_finite_for_huge_values():
    z = torch.tensor([[1e30, -1e30], [-1e30, 3.0], [2e30, 0.0]])
    for name in fsp_math.MOMENT_TARGETS:
        loss = fsp_math.moment_loss(z, name)
        assert math.isfinite(float(loss)) and float(loss) >= 0


def on_two_ranks(monkeypatch, halves, loss_of):
    """Two threads stand in for two ranks: the fake all-reduce sums what both put in."""
    barrier, slots, local = threading.Barrier(2), [None, None], threading.local()

    def summed(t):
        slots[local.rank] = t.detach()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        return total

    monkeypatch.setattr(fsp_math.distributed, "sum_over_ranks", summed)
    found = [None, None]

    def rank(r):
        local.rank = r
        found[r] = loss_of(halves[r], sync=True)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return found


def test_synced_moments_over_two_ranks_equal_one_process_on_the_joined_batch(monkeypatch):
    z = torch.randn(13, 4, generator=torch.Generator().manual_seed(6)) * 2 + 1
    found = on_two_ranks(
        monkeypatch, [z[:5], z[5:]], lambda h, sync: fsp_math.moment_loss(h, "kurt", sync)
    )
    expected = fsp_math.moment_loss(z, "kurt")
    for loss in found:
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_pre_norm_standardises_over_the_batch_in_training_and_by_running_stats_at_eval():
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(4)) * 4 + 2
    q = FSP([8, 5, 5], activation="normal", quantize_rate=1.0, pre_norm=True)
    plain = FSP([8, 5, 5], activation="normal", quantize_rate=1.0)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    torch.testing.assert_close(q(x).quantized, plain((x - mean) / (var + 1e-5).sqrt()).quantized)
    running_mean, running_var = 0.1 * mean, 0.9 + 0.1 * x.var(0)
    q, plain = q.eval(), plain.eval()
    standardised = (x - running_mean) / (running_var + 1e-5).sqrt()
    assert torch.equal(q(x).indices, plain(standardised).indices)


def test_pre_norm_over_two_ranks_equals_one_process_on_the_joined_batch(monkeypatch):
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(8)) * 3 + 1
    torch.manual_seed(0)
    joined = FSP([8, 5, 5], dim=6, activation="normal", quantize_rate=1.0, pre_norm=True)
    ranks = [copy.deepcopy(joined), copy.deepcopy(joined)]
    expected = joined(x)
    monkeypatch.setattr(fsp_math.distributed, "is_distributed", lambda: True)
    halves = [x[:5], x[5:]]
    found = on_two_ranks(monkeypatch, halves, lambda h, sync: ranks[int(len(h) != 5)](h))
    torch.testing.assert_close(torch.cat([f.quantized for f in found]), expected.quantized)
    assert torch.equal(torch.cat([f.indices for f in found]), expected.indices)
    for rank, f in zip(ranks, found, strict=True):
        torch.testing.assert_close(f.loss, expected.loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rank.pre_norm.running_var, joined.pre_norm.running_var)


VARIANTS = {
    "tanh": lambda: FSP([5, 4, 3]),
    "cauchy-inverse-proj": lambda: FSP([8, 5], dim=6, activation="cauchy", inverse_activation=True),
    "laplace-inverse-kurt": lambda: FSP([3, 7], activation="laplace", inverse_activation=True,
                                        quantize_rate=0.5, vector_norm="kurt"),
    "sigmoid-proj": lambda: FSP([6, 6], dim=6, activation="sigmoid", vector_norm="var_sigmoid"),
    "normal-pre-norm": lambda: FSP([8, 5, 5], dim=6, activation="normal", quantize_rate=0.5,
                                   vector_norm="var", pre_norm=True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_extreme_inputs_and_tiny_batches_give_finite_outputs_and_a_finite_loss(
    name, dtype, training
):
    torch.manual_seed(0)
    q = VARIANTS[name]().train(training)
    big = 1e4 if dtype == torch.float16 else 1e30
    d = q.dim
    for x in [
        torch.full((3, d), big),
        torch.tensor([[big, -big] * d]).reshape(-1, d)[:2].clone(),
        torch.randn(1, d),
        torch.zeros(0, d),
        torch.randn(4, 2, d) * 1e6,
        torch.full((5, d), -3.5),
    ]:
        out = q(x.clamp(-big, big).to(dtype))  # float16: at most 1e4, no inf
        assert out.quantized.dtype == dtype and torch.isfinite(out.quantized).all()
        assert out.indices.dtype == torch.int64 and out.indices.shape == x.shape[:-1]
        if out.indices.numel():
            assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
        loss = float(out.loss.detach())
        assert out.loss.dtype == torch.float32 and math.isfinite(loss) and loss >= 0
        assert x.shape[0] * math.prod(x.shape[1:-1]) >= 2 or loss == 0.0


levels_lists = st.lists(st.integers(2, 9), min_size=1, max_size=4)


@given(levels=levels_lists, act=st.sampled_from(ACTIVATIONS), inverse=st.booleans(),
       scale=st.sampled_from([0.1, 1.0, 10.0, 1e4]), seed=st.integers(0, 2**16))  # fmt: skip
@PROPERTY
def test_eval_indices_are_the_bins_of_the_activation_and_decode_to_the_output(
    levels, act, inverse, scale, seed
):
    q = FSP(levels, activation=act, inverse_activation=inverse).eval()
    x = torch.randn(50, len(levels), generator=torch.Generator().manual_seed(seed)) * scale
    with torch.no_grad():
        out = q(x)
        decoded = q.indices_to_codes(out.indices)
    assert out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < math.prod(levels)
    assert torch.equal(decoded, out.quantized)
    act_values = fsp_math.CDFS[act][0](x)
    bins = torch.tensor(levels)
    level_idx = (out.indices.unsqueeze(-1) // torch.cumprod(
        torch.tensor([1, *levels[:-1]]), 0)) % bins  # fmt: skip
    low, high = level_idx / bins, (level_idx + 1) / bins
    assert ((act_values >= low - 1e-6) & (act_values <= high + 1e-6)).all()


@given(levels=levels_lists, rate=st.sampled_from([0.0, 0.25, 0.9]), seed=st.integers(0, 2**16))
@PROPERTY
def test_perturbed_values_stay_within_half_a_bin_of_the_activation_and_inside_0_1(
    levels, rate, seed
):
    gen = torch.Generator().manual_seed(seed)
    n, bins = 200, torch.tensor(levels, dtype=torch.int32)
    act = torch.rand(n, len(levels), generator=gen)
    act[:4] = torch.tensor([0.0, 1.0, 1e-7, 1 - 1e-7])[:, None]  # the edges
    _, midpoints = fsp_math.fsp_bins(act, bins)
    shift, keep = torch.rand(act.shape, generator=gen), torch.rand(act.shape, generator=gen)
    values = fsp_math.fsp_perturb(act, midpoints, bins, shift, keep, rate)
    quantized = keep <= rate
    assert torch.equal(values[quantized], midpoints[quantized])
    moved = values[~quantized]
    base = act[~quantized]
    half = (1.0 / (2 * bins)).expand_as(act)[~quantized]
    assert ((moved - base).abs() <= half + 1e-7).all()
    assert (((moved > 0) & (moved < 1)) | (moved == base)).all()  # rejected: unmoved


def test_the_perturbation_is_uniform_over_half_a_bin_each_side():
    gen = torch.Generator().manual_seed(7)
    bins = torch.tensor([4], dtype=torch.int32)
    act = torch.full((40000, 1), 0.5)
    shift, keep = torch.rand(act.shape, generator=gen), torch.rand(act.shape, generator=gen)
    offsets = (fsp_math.fsp_perturb(act, act, bins, shift, keep, 0.0) - 0.5) * 8  # in (-1, 1)
    assert abs(float(offsets.mean())) < 0.02 and abs(float(offsets.var()) - 1 / 3) < 0.01
    assert float(offsets.min()) >= -1 and float(offsets.max()) <= 1


def test_training_output_is_perturbed_within_half_a_bin_and_indices_stay_the_bins():
    torch.manual_seed(8)
    q = FSP([5, 8], activation="normal").train()
    x = torch.randn(300, 2)
    out = q(x)
    act = fsp_math.CDFS["normal"][0](x)
    values = out.quantized.detach() * fsp_math.UNIFORM_STD + 0.5
    assert ((values - act).abs() <= 1.0 / (2 * torch.tensor([5, 8])) + 1e-6).all()
    assert (values >= 0).all() and (values <= 1).all()
    assert torch.equal(out.indices, q.eval()(x).indices)
    assert not torch.equal(out.quantized, q(x).quantized)  # the train / eval gap


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"levels": []}, "levels=\\[\\], allowed is a non-empty list"),
        ({"levels": [4, 1]}, "levels=\\[4, 1\\]"),
        ({"levels": [2.5]}, "integers >= 2"),
        ({"levels": "88"}, "levels='88'"),
        ({"levels": [2**31] * 2}, "allowed is fewer than 2\\*\\*62"),
        ({"dim": 0}, "dim=0, allowed is an integer >= 1"),
        ({"activation": "relu"}, "activation='relu', allowed is one of tanh, sigmoid"),
        ({"activation": ["tanh"]}, "activation=\\['tanh'\\]"),
        ({"quantize_rate": 1.5}, "quantize_rate=1.5, allowed is a number in \\[0, 1\\]"),
        ({"quantize_rate": -0.1}, "quantize_rate=-0.1"),
        ({"quantize_rate": True}, "quantize_rate=True"),
        ({"quantize_rate": "0.5"}, "quantize_rate='0.5'"),
        ({"vector_norm": "l2"}, "vector_norm='l2', allowed is one of none, var, kurt"),
        ({"inverse_activation": "yes"}, "inverse_activation='yes', allowed is true or false"),
        ({"pre_norm": 1}, "pre_norm=1, allowed is true or false"),
    ],
)
def test_bad_options_are_one_line_config_errors(options, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        FSP(**{"levels": [8, 5], **options})
    assert "\n" not in str(err.value)


def test_the_preset_builds_what_the_table_says_and_the_monitor_reads_its_levels():
    q = stabq.build_quantizer("fsp", 128)
    assert type(q) is FSP and q.codebook_size == 64000 and q.grid
    assert (q.levels, q.activation, q.quantize_rate) == ([8, 8, 8, 5, 5, 5], "normal", 0.5)
    assert (q.inverse_activation, q.vector_norm, q.pre_norm.affine) == (False, "var", False)
    q = stabq.build_quantizer("fsp", 128, pre_norm=False)  # can saturate: the monitor says so
    monitor = CollapseMonitor(q, check_every=10)
    assert (monitor.codebook_size, monitor.num_codebooks, monitor.levels) == (
        64000, 1, [8, 8, 8, 5, 5, 5],
    )  # fmt: skip
    with pytest.warns(stabq.CollapseWarning, match=r"FSQ saturated: (99|100)"), torch.no_grad():
        for _ in range(20):
            q(torch.randn(64, 128) * 1e4)
    assert monitor.alerts[0].kind == "saturation"
    monitor.detach()


def test_usage_counts_the_preset_indices():
    torch.manual_seed(0)
    q = stabq.build_quantizer("fsp", 32).eval()
    usage = CodebookUsage.for_quantizer(q)
    indices = q(torch.randn(64, 32)).indices
    usage.update(indices)
    found = usage.compute()
    distinct = indices.unique().numel()
    assert found["usage"] == pytest.approx(distinct / 64000)
    assert found["dead_codes"] is None and found["samples"] == 64 and distinct > 1


def test_a_few_training_steps_of_the_classifier_stay_finite_and_quiet():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    model = BottleneckClassifier(input_dim=12, num_classes=2, quantizer="fsp", hidden=32)
    result = stabq.train(model, (x, y), config=stabq.TrainConfig(epochs=2, batch_size=32))
    for epoch in result.history:
        assert all(math.isfinite(v) for v in epoch.values() if isinstance(v, float))
    logits, out = model.eval()(torch.from_numpy(x))
    assert torch.isfinite(logits).all() and (out.indices >= 0).all()
    assert math.isfinite(float(out.loss.detach())) and float(out.loss.detach()) >= 0


class PeerNet(torch.nn.Module):
    """A user's model on the peer's FSP, whose forward unpacks its 4-tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(6, 16)
        self.fsp = vqp.FSP([8, 5, 5], dim=16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        out, indices, loss, info = self.fsp(self.enc(x))
        assert isinstance(info, dict)
        return self.head(out), indices, loss


def test_swap_replaces_the_peers_fsp_and_the_users_loop_runs_unchanged():
    torch.manual_seed(0)
    model = PeerNet()
    report = stabq.swap_quantizers(model, "fsp")
    swapped = [(s.path, s.old_class, s.dim) for s in report]
    assert swapped == [("fsp", "vector_quantize_pytorch.FSP", 16)]
    q = report[0].quantizer
    assert type(q) is FSP and q.dim == 16
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        logits, indices, loss = model(x)
        total = torch.nn.functional.cross_entropy(logits, y) + loss
        opt.zero_grad()
        total.backward()
        opt.step()
    assert indices.dtype == torch.int32 and indices.shape == (64,) and loss.dim() == 0
    model.eval()
    with torch.no_grad():
        out, indices, loss, info = model.fsp(model.enc(x))
        assert info == {} and torch.equal(q.indices_to_codes(indices), out)
