"""DiVeQ (directional_reparam) against vector-quantize-pytorch 1.32, its formula against a
brute-force computation, its options, and the presets diveq and rvq-diveq."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from vector_quantize_pytorch import ResidualVQ as PeerResidualVQ
from vector_quantize_pytorch import VectorQuantize

import stabq
from stabq import CodebookUsage, CollapseMonitor, ConfigError
from stabq.quantizers.gradients import directional_reparam

DIM, K = 16, 64


def vq_pair(variance: float) -> tuple[stabq.VectorQuantizer, VectorQuantize]:
    """stabq's DiVeQ VectorQuantizer holding the peer's codebook."""
    torch.manual_seed(0)
    peer = VectorQuantize(
        DIM, K, directional_reparam=True, directional_reparam_variance=variance,
        threshold_ema_dead_code=1e-3,  # the peer requires one; 1e-3 replaces nothing here
    )  # fmt: skip
    ours = stabq.VectorQuantizer(
        DIM, K, directional_reparam=True, directional_reparam_variance=variance,
        dead_code_threshold=1e-3,
    )  # fmt: skip
    with torch.no_grad():
        ours.codebook.embed.copy_(peer._codebook.embed)
    return ours, peer


def rvq_pair() -> tuple[stabq.ResidualVQ, PeerResidualVQ]:
    torch.manual_seed(0)
    peer = PeerResidualVQ(dim=DIM, num_quantizers=3, codebook_size=K, diveq=True)
    ours = stabq.ResidualVQ(
        DIM, num_quantizers=3, codebook_size=K, directional_reparam=True, dead_code_threshold=1e-3
    )
    with torch.no_grad():
        for mine, theirs in zip(ours.layers, peer.layers, strict=True):
            mine.embed.copy_(theirs._codebook.embed)
    return ours, peer


def run(module: nn.Module, x: torch.Tensor, seed: int = 1):
    """Quantized, indices, the input's gradient and each codebook's gradient."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the noise: both draw it once, shaped like the input
    quantized, indices = module(x)[:2]
    (quantized * torch.linspace(-1, 1, quantized.numel()).view_as(quantized)).sum().backward()
    books = [p for n, p in module.named_parameters() if n.endswith("embed")]
    return quantized.detach(), indices, x.grad, [b.grad for b in books]


@pytest.mark.parametrize("variance", [0.0, 5e-3, 0.5])
def test_diveq_vq_equals_the_peer(variance):
    ours, peer = vq_pair(variance)
    x = torch.randn(2, 150, DIM)
    (q, idx, gx, gc), (pq, pidx, pgx, pgc) = run(ours, x), run(peer, x)
    assert torch.equal(idx, pidx) and idx.unique().numel() > 20
    torch.testing.assert_close(q, pq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, pgx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gc[0], pgc[0], rtol=1e-4, atol=1e-5)
    assert gc[0].abs().sum(-1).gt(0).sum() == idx.unique().numel()  # chosen codes learn
    if variance == 0:  # the value is the code, up to rounding
        torch.testing.assert_close(q, ours.codes[idx], rtol=0, atol=1e-5)


def test_diveq_rvq_equals_the_peers_diveq_mode():
    ours, peer = rvq_pair()
    x = torch.randn(2, 150, DIM)
    (q, idx, gx, gc), (pq, pidx, pgx, pgc) = run(ours, x), run(peer, x)
    assert torch.equal(idx, pidx)
    torch.testing.assert_close(q, pq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, pgx, rtol=1e-4, atol=1e-5)
    for a, b in zip(gc, pgc, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert a.abs().sum() > 0  # every layer's codebook learns


def test_in_evaluation_the_output_is_the_code_where_the_peers_rvq_keeps_its_noise():
    ours, peer = rvq_pair()
    ours.eval(), peer.eval()
    x = torch.randn(1, 50, DIM)
    q, idx = ours(x)[:2]
    codes = ours.indices_to_codes(idx)
    torch.testing.assert_close(q, codes, rtol=0, atol=1e-5)
    torch.manual_seed(0)
    pq = peer(x)[0]
    assert (pq - codes).abs().max() > 1e-3  # the peer's ResidualVQ draws noise in eval too


def brute_force(x: torch.Tensor, q: torch.Tensor, noise: torch.Tensor, variance: float):
    """Row by row in float64: x + unit(q - x + sqrt(var) n) |q - x|."""
    rows = []
    for xi, qi, ni in zip(x.double(), q.double(), noise.double(), strict=True):
        v = qi - xi + math.sqrt(variance) * ni
        norm = math.sqrt(float((v * v).sum()))
        rows.append(xi + v / max(norm, 1e-12) * math.sqrt(float(((qi - xi) ** 2).sum())))
    return torch.stack(rows)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 20),
    d=st.integers(1, 8),
    variance=st.sampled_from([0.0, 1e-4, 5e-3, 1.0]),
)
def test_the_formula_against_brute_force(seed, rows, d, variance):
    g = torch.Generator().manual_seed(seed)
    x, q = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
    out = directional_reparam(x, q, variance, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(rows, d, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.double(), brute_force(x, q, noise, variance), atol=1e-5, rtol=0)
    error = (q - x).norm(dim=-1)
    torch.testing.assert_close((out - x).norm(dim=-1), error, atol=1e-5, rtol=1e-5)
    bound = 2 * math.sqrt(variance) * noise.norm(dim=-1) + 1e-5
    assert ((out - q).norm(dim=-1) <= bound).all()  # about the code, exactly it at var 0


def test_gradient_reaches_input_and_code_and_a_zero_error_row_stays_finite():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    q = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    out = directional_reparam(x, q, variance=0.0)
    out.sum().backward()
    # row 0: direction u = (0.6, 0.8) held constant; d|q - x|/dq = u, so grad_q = u (u.1)
    torch.testing.assert_close(q.grad[0], torch.tensor([0.84, 1.12]))
    torch.testing.assert_close(x.grad[0], torch.tensor([1 - 0.84, 1 - 1.12]))
    torch.testing.assert_close(out[1].detach(), torch.tensor([1.0, 1.0]))  # q = x: x
    assert torch.isfinite(x.grad).all() and torch.isfinite(q.grad).all()


def test_the_codebook_is_learned_and_usage_counted_over_the_decay_horizon():
    q = stabq.VectorQuantizer(DIM, K, decay=0.9, dead_code_threshold=2.0, directional_reparam=True)
    assert q.codebook.learned and isinstance(q.codebook.embed, nn.Parameter)
    assert q.codebook.horizon == pytest.approx(10.0)  # decay sets the dead-code horizon
    assert stabq.VectorQuantizer(
        DIM, K, decay=None, dead_code_threshold=2.0, directional_reparam=True
    ).codebook.horizon == pytest.approx(100.0)
    x = torch.randn(256, DIM)
    before = q.codes.clone()
    loss = q(x).loss
    assert float(loss) == 0.0 and not loss.requires_grad  # no commitment or codebook loss
    # every code the batch left unused: cluster size 0.9 (x 10 = 9 >= 2), not replaced
    assert torch.equal(q.codes, before)
    for _ in range(25):
        q(x[:4] * 0 + x[:1])  # one input: all but one code fall under 2 uses per horizon
    assert (q.codes != before).any(dim=-1).sum() > K // 2  # dead codes were replaced


@pytest.mark.parametrize(
    "options",
    [
        {"rotation_trick": True},
        {"cosine": True},
        {"dead_code_threshold": 0.0},
        {"directional_reparam_variance": -1.0},
        {"directional_reparam_variance": float("inf")},
        {"decay": 1.0},
    ],
)
def test_bad_options_are_refused(options):
    base = {"dead_code_threshold": 2.0, "directional_reparam": True}
    with pytest.raises(ConfigError, match="VectorQuantizer"):
        stabq.VectorQuantizer(DIM, K, **{**base, **options})
    if "cosine" not in options:
        with pytest.raises(ConfigError, match="ResidualVQ"):
            stabq.ResidualVQ(DIM, codebook_size=K, **{**base, **options})


@pytest.mark.parametrize(("name", "cls", "codebooks"), [
    ("diveq", stabq.VectorQuantizer, 1), ("rvq-diveq", stabq.ResidualVQ, 4),
])  # fmt: skip
def test_the_preset_builds_and_counts(name, cls, codebooks):
    q = stabq.build_quantizer(name, 128)
    assert type(q) is cls and q.directional_reparam and q.num_codebooks == codebooks
    assert isinstance(q.pre_norm, nn.BatchNorm1d) and not q.pre_norm.affine  # stress
    monitor = CollapseMonitor(q)
    assert (monitor.codebook_size, monitor.num_codebooks) == (q.codebook_size, codebooks)
    monitor.detach()
    usage = CodebookUsage.for_quantizer(q.eval())
    indices = q(torch.randn(64, 128)).indices
    usage.update(indices)
    per = usage.compute()["per_codebook"][0]
    distinct = indices.reshape(64, -1)[:, 0].unique().numel()
    assert per["usage"] == pytest.approx(distinct / q.codebook_size) and distinct > 1
    # a few training steps: tests/test_new_presets.py, for every newer preset


def test_swap_a_peer_vector_quantize_for_diveq_and_train_its_codebook():
    torch.manual_seed(0)
    model = nn.Module()
    model.vq = VectorQuantize(dim=32, codebook_size=64)
    report = stabq.swap_quantizers(model, "diveq", codebook_size=16)
    assert [s.path for s in report] == ["vq"]
    q = report[0].quantizer
    assert isinstance(q, stabq.VectorQuantizer) and q.directional_reparam
    x = torch.randn(4, 10, 32, requires_grad=True)
    quantized, indices, loss = model.vq(x)
    assert quantized.shape == x.shape and indices.shape == (4, 10)
    (quantized.square().sum() + loss.sum()).backward()
    assert x.grad.abs().sum() > 0 and q.codebook.embed.grad.abs().sum() > 0


def standardised(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Reference of ``pre_norm``: ``(x - mean) / sqrt(var + 1e-5)`` in float64."""
    return ((x.double() - mean.double()) / (var.double() + 1e-5).sqrt()).float()


def pre_norm_pair(cls, **options) -> tuple[nn.Module, nn.Module]:
    """The module with ``pre_norm=True`` and the same module without, sharing codebooks."""
    torch.manual_seed(0)
    normed = cls(DIM, codebook_size=K, pre_norm=True, **options)
    plain = cls(DIM, codebook_size=K, **options)
    plain.load_state_dict(normed.state_dict(), strict=False)
    return normed, plain


@pytest.mark.parametrize(("cls", "options"), [
    (stabq.VectorQuantizer, {"directional_reparam": True, "dead_code_threshold": 2.0}),
    (stabq.ResidualVQ, {"directional_reparam": True, "dead_code_threshold": 2.0}),
    (stabq.VectorQuantizer, {"kmeans_init": True, "dead_code_threshold": 2.0}),
    (stabq.ResidualVQ, {"num_quantizers": 2, "kmeans_init": True}),
])  # fmt: skip
def test_pre_norm_quantizes_the_batch_standardised_and_evaluates_with_running_statistics(
    cls, options
):
    normed, plain = pre_norm_pair(cls, **options)
    x = torch.randn(200, DIM) * torch.linspace(0.1, 500, DIM) + 30
    mean, var = x.double().mean(0), x.double().var(0, unbiased=False)
    torch.manual_seed(3)  # k-means seeds, dead codes and DiVeQ's noise drawn alike
    out = normed(x)
    torch.manual_seed(3)
    ref = plain(standardised(x, mean, var))
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized, rtol=1e-4, atol=1e-4)
    assert out.quantized.norm(dim=-1).mean() < 3 * DIM**0.5  # the codes' scale, not x's
    running_mean, running_var = 0.1 * mean, 0.9 + 0.1 * x.double().var(0)
    stats = normed.pre_norm.running_mean, normed.pre_norm.running_var  # float32 sums
    torch.testing.assert_close(stats[0].double(), running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[1].double(), running_var, rtol=1e-5, atol=1e-5)
    normed.eval(), plain.eval()
    test = torch.randn(7, DIM) * 40
    out, ref = normed(test), plain(standardised(test, running_mean, running_var))
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.quantized, normed.indices_to_codes(out.indices))


@pytest.mark.parametrize("cls", [stabq.VectorQuantizer, stabq.ResidualVQ])
def test_pre_norm_makes_the_codes_blind_to_the_encoders_scale(cls):
    """The failure it repairs: features 1000x larger reach the same codes."""
    options = {"directional_reparam": True, "dead_code_threshold": 2.0, "pre_norm": True}
    x = torch.randn(64, DIM)
    chosen = []
    for scale in (1.0, 1000.0):
        torch.manual_seed(0)
        q = cls(DIM, codebook_size=K, **options)
        chosen.append(q(x * scale).indices)
    assert torch.equal(*chosen) and chosen[0].unique().numel() > 10
    one = cls(DIM, codebook_size=K, **options)(x[:1])  # one row: running statistics
    assert torch.isfinite(one.quantized).all()


@pytest.mark.parametrize("cls", [stabq.VectorQuantizer, stabq.ResidualVQ])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_pre_norm_must_be_a_bool(cls, value):
    with pytest.raises(ConfigError, match=f"{cls.__name__}: pre_norm="):
        cls(DIM, codebook_size=K, pre_norm=value)
