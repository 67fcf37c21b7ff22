"""LFQ and BSQ against vector-quantize-pytorch 1.32's LFQ, and the entropy penalty
against a brute-force computation over all 2^d codes."""

from __future__ import annotations

import math

import pytest
import torch
from vector_quantize_pytorch import LFQ as PeerLFQ

from stabq import LFQ, ConfigError
from stabq.quantizers.lfq import bit_entropies, correlation_penalty

CASES = [(4, 1, None), (5, 2, 16), (3, 1, 8)]  # (bits, num_codebooks, dim)


def pair(bits, num_codebooks, dim, spherical, **kw):
    torch.manual_seed(0)
    peer = PeerLFQ(
        dim=dim,
        codebook_size=2**bits,
        num_codebooks=num_codebooks,
        spherical=spherical,
        entropy_loss_weight=kw.get("entropy_weight", 0.1),
        commitment_loss_weight=kw.get("commitment_weight", 0.0),
    )
    ours = LFQ(dim or bits * num_codebooks, bits, num_codebooks, spherical=spherical, **kw)
    projections = {k: v for k, v in peer.state_dict().items() if k.startswith("project_")}
    ours.load_state_dict(projections)
    return ours, peer


def codes_z(q: LFQ, x: torch.Tensor) -> torch.Tensor:
    """The input to the sign, ``(n, C, d)``: projected, on the sphere for BSQ."""
    return q._sphere(q.project_in(x).view(-1, q.num_codebooks, q.bits))


def brute_force(z: torch.Tensor, q: LFQ, clamp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample entropy and the entropy of the batch's mean code distribution, both
    ``(C,)``, over all ``2^d`` codes in float64 (``log(max(p, clamp))`` as the peer's)."""
    d = q.bits
    bits = (torch.arange(2**d)[:, None] & q.mask) != 0
    codes = q._signs_to_codes(bits, torch.float64)  # (2^d, d), index order
    probs = torch.softmax(2 * q.inv_temperature * z.double() @ codes.T, dim=-1)  # (n, C, 2^d)

    def entropy(p):
        return -(p * p.clamp_min(clamp).log()).nan_to_num().sum(-1)

    return entropy(probs).mean(0), entropy(probs.mean(0))


@pytest.mark.parametrize("spherical", [False, True], ids=["lfq", "bsq"])
@pytest.mark.parametrize(("bits", "num_codebooks", "dim"), CASES)
def test_indices_and_codes_equal_the_peer(bits, num_codebooks, dim, spherical):
    ours, peer = pair(bits, num_codebooks, dim, spherical)
    x = torch.randn(1, 300, ours.dim)
    ours.eval(), peer.eval()
    out, (pq, pidx, _) = ours(x), peer(x)
    assert torch.equal(out.indices, pidx)
    assert torch.equal(out.quantized, pq)  # eval: the codes, exactly
    assert torch.equal(ours.indices_to_codes(out.indices), peer.indices_to_codes(pidx))
    assert out.indices.unique().numel() > 2 ** min(bits, 4) // 2
    ours.train(), peer.train()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    qa, qb = ours(xa).quantized, peer(xb).quantized
    assert torch.equal(qa, out.quantized)  # training too: code + (z - sg(z)) is the code
    torch.testing.assert_close(qa, qb, rtol=0, atol=1e-6)  # the peer's z + sg(q - z): rounding
    (qa * torch.arange(qa.shape[-1])).sum().backward()
    (qb * torch.arange(qb.shape[-1])).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spherical", [False, True], ids=["lfq", "bsq"])
@pytest.mark.parametrize(("bits", "num_codebooks", "dim"), CASES)
def test_entropy_terms_against_all_codes_and_the_peer(bits, num_codebooks, dim, spherical):
    ours, peer = pair(bits, num_codebooks, dim, spherical, commitment_weight=0.25)
    x = torch.randn(1, 64, ours.dim) * 0.05  # small: soft code distributions
    with torch.no_grad():
        z = codes_z(ours, x[0]).double()
        a = ours.codebook_scale / math.sqrt(bits) if spherical else ours.codebook_scale
        sample, marginal = bit_entropies(z * 4 * ours.inv_temperature * a)
        exact_sample, joint = brute_force(z, ours)
        # per-sample entropy: the factorisation is exact
        torch.testing.assert_close(sample, exact_sample, rtol=1e-9, atol=1e-12)
        # codebook entropy: the product of the bit marginals bounds the joint from above
        assert (marginal >= joint - 1e-9).all() and (marginal > joint + 1e-3).any()
        # the peer: the same softmax, log(max(p, 1e-5)) and the joint over 2^d codes
        (_, _, peer_loss), (p_sample, p_codebook, p_commit) = peer(x, return_loss_breakdown=True)
        clamped_sample, clamped_joint = brute_force(z, ours, clamp=1e-5)
        torch.testing.assert_close(p_sample.double(), clamped_sample.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p_codebook.double(), clamped_joint.mean(), rtol=1e-5, atol=1e-6)
        # stabq's loss: 0.1 (H_sample + (d ln 2 - H_marginal)) + 0.25 commitment, >= 0
        loss = ours(x).loss
        want = 0.1 * (exact_sample + bits * math.log(2) - marginal).mean() + 0.25 * p_commit
        torch.testing.assert_close(loss.double(), want.double(), rtol=1e-5, atol=1e-6)
        assert float(loss) >= 0 > float(peer_loss) - 0.25 * float(p_commit)


def test_one_input_the_marginals_give_the_joint_entropy_exactly():
    q = LFQ(6, 6)
    z = torch.randn(1, 1, 6, dtype=torch.float64) * 0.01
    _, marginal = bit_entropies(z * 4 * q.inv_temperature)
    torch.testing.assert_close(marginal, brute_force(z, q)[1], rtol=1e-9, atol=1e-12)


def test_bits_that_move_together_are_what_the_codebook_term_cannot_see():
    # Half the batch all +, half all -: two codes used, the joint entropy is ln 2, the
    # product of marginals (every bit used half the time) is d ln 2: the penalty is zero.
    q = LFQ(5, 5)
    z = torch.cat([torch.ones(8, 1, 5), -torch.ones(8, 1, 5)]).double()
    _, marginal = bit_entropies(z * 4 * q.inv_temperature)
    torch.testing.assert_close(marginal, torch.tensor([5 * math.log(2)], dtype=torch.float64))
    torch.testing.assert_close(
        brute_force(z, q)[1], torch.tensor([math.log(2)], dtype=torch.float64)
    )


def test_entropy_gradients_stay_finite_where_sigmoid_is_flat():
    q = LFQ(4, 4).train()
    x = torch.tensor([[1e6, -1e6, 3e4, 0.0]] * 5, requires_grad=True)
    loss = q(x).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_indices_are_most_significant_bit_first():
    q = LFQ(4, 4).eval()
    out = q(torch.tensor([[1.0, -1.0, -1.0, 2.0], [-1.0, -1.0, -1.0, -1.0]]))
    assert out.indices.tolist() == [9, 0]
    assert out.quantized.tolist() == [[1.0, -1.0, -1.0, 1.0], [-1.0] * 4]


def test_bsq_codes_sit_on_the_unit_sphere_and_keep_their_signs_on_huge_inputs():
    q = LFQ(16, 16, spherical=True).eval()
    x = torch.randn(10, 16) * 1e30  # the norm overflows float32
    out = q(x)
    torch.testing.assert_close(out.quantized.abs(), torch.full((10, 16), 0.25))
    assert torch.equal(out.quantized > 0, x > 0)


def test_bad_arguments_name_the_value():
    with pytest.raises(ConfigError, match="bits=None with dim=10 and num_codebooks=3"):
        LFQ(10, num_codebooks=3)
    with pytest.raises(ConfigError, match="bits=63, allowed is at most 62"):
        LFQ(8, 63)


def reference_correlation_penalty(z: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal Pearson correlation, written out in float64."""
    r = torch.corrcoef(z.double().T)
    d = z.shape[1]
    return (r.pow(2).sum() - d) / (d * (d - 1))


def test_correlation_penalty_equals_the_pearson_correlations():
    torch.manual_seed(0)
    z = torch.randn(50, 6) @ torch.randn(6, 6)  # correlated columns
    want = reference_correlation_penalty(z)
    torch.testing.assert_close(correlation_penalty(z).double(), want, rtol=1e-5, atol=1e-7)
    copies = torch.cat([z[:, :1]] * 4, 1)  # every pair correlates fully: 1
    torch.testing.assert_close(correlation_penalty(copies), torch.tensor(1.0))
    assert float(correlation_penalty(z[:1])) == 0.0 and float(correlation_penalty(z[:, :1])) == 0


@pytest.mark.parametrize("spherical", [False, True], ids=["lfq", "bsq"])
def test_decorrelation_weight_adds_the_projection_penalty(spherical):
    torch.manual_seed(0)
    plain = LFQ(12, 4, 2, pre_norm=True, spherical=spherical)
    q = LFQ(12, 4, 2, pre_norm=True, spherical=spherical, decorrelation_weight=0.5)
    q.load_state_dict(plain.state_dict())
    x = torch.randn(40, 12)
    z = q.project_in(x).detach()
    z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)  # pre_norm's
    want = plain(x).loss.double() + 0.5 * reference_correlation_penalty(z)
    torch.testing.assert_close(q(x).loss.double(), want, rtol=1e-5, atol=1e-6)
    q(x).loss.backward()  # the penalty reaches the projection
    assert q.project_in.weight.grad.abs().sum() > 0


def test_decorrelation_weight_must_be_a_number_at_least_zero():
    with pytest.raises(ConfigError, match="decorrelation_weight=-1"):
        LFQ(8, 8, decorrelation_weight=-1)
