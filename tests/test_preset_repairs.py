"""The options behind the simvq, lfq and bsq presets: SimVQ's `pre_norm` and
`identity_transform`, LFQ's `pre_norm` and `decorrelation_weight`, against computations
written out here."""

from __future__ import annotations

import pytest
import torch

import stabq
from stabq import LFQ, ConfigError, SimVQ
from stabq.quantizers.codebook import kmeans

DIM, K, EPS = 16, 64, 1e-5


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension batch standardisation, biased variance, as BatchNorm in training."""
    return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + EPS)


def test_identity_transform_starts_the_codebook_as_the_basis():
    torch.manual_seed(0)
    q = SimVQ(DIM, K, identity_transform=True)
    assert torch.equal(q.transform.weight, torch.eye(DIM))
    assert torch.equal(q.codebook.detach(), q.basis)
    torch.manual_seed(0)
    plain = SimVQ(DIM, K)
    assert torch.equal(plain.basis, q.basis)  # the same basis drawn, only W differs
    assert not torch.equal(plain.codebook.detach(), plain.basis)


def test_simvq_pre_norm_quantizes_the_standardised_input():
    torch.manual_seed(0)
    x = torch.randn(128, DIM) * 50 + 7
    q = SimVQ(DIM, K, pre_norm=True, identity_transform=True)
    ref = SimVQ(DIM, K, identity_transform=True)
    ref.basis.copy_(q.basis)
    quantized, indices, loss = q(x)
    z = standardise(x)
    want_q, want_i, want_loss = ref(z)
    assert torch.equal(indices, want_i)
    torch.testing.assert_close(quantized, want_q)
    torch.testing.assert_close(loss, want_loss)
    brute = torch.cdist(z, q.basis).argmin(-1)  # W = I: the codebook is the basis
    assert torch.equal(indices, brute)


def test_simvq_pre_norm_uses_running_statistics_in_eval():
    torch.manual_seed(0)
    q = SimVQ(DIM, K, pre_norm=True)
    for _ in range(3):
        q(torch.randn(64, DIM) * 3 + 1)
    x = torch.randn(10, DIM)
    norm = q.pre_norm
    z = (x - norm.running_mean) / torch.sqrt(norm.running_var + EPS)
    brute = torch.cdist(z, q.codebook.detach()).argmin(-1)
    assert torch.equal(q.eval()(x).indices, brute)


def test_simvq_init_from_features_standardises_them_with_pre_norm():
    torch.manual_seed(0)
    q = SimVQ(DIM, 8, pre_norm=True)
    x = torch.randn(4, 50, DIM) * 10 + 3
    torch.manual_seed(3)
    want, _ = kmeans(standardise(x.reshape(-1, DIM))[None], 8, 10)
    torch.manual_seed(3)
    q.init_from_features(x)
    torch.testing.assert_close(q.codebook.detach(), want[0])


@pytest.mark.parametrize("spherical", [False, True], ids=["lfq", "bsq"])
def test_lfq_pre_norm_takes_the_signs_of_the_standardised_projection(spherical):
    torch.manual_seed(0)
    q = LFQ(32, bits=8, pre_norm=True, spherical=spherical)
    x = torch.randn(100, 32)
    z = standardise(q.project_in(x).detach())
    want = ((z > 0).long() * 2 ** torch.arange(7, -1, -1)).sum(-1)
    assert torch.equal(q(x).indices, want)


def test_lfq_pre_norm_ignores_the_scale_and_offset_of_each_input():
    torch.manual_seed(0)
    q = LFQ(8, bits=8, pre_norm=True)  # no projection: the bits are the input's signs
    x = torch.randn(200, 8)
    scale, offset = torch.rand(8) * 1e3 + 1e-2, torch.randn(8) * 100
    assert torch.equal(q(x).indices, q(x * scale + offset).indices)
    plain = LFQ(8, bits=8)
    assert not torch.equal(plain(x).indices, plain(x * scale + offset).indices)


def test_every_bit_of_a_standardised_batch_takes_both_signs():
    torch.manual_seed(0)
    q = LFQ(8, bits=8, pre_norm=True)
    x = torch.randn(64, 8) + 30  # every raw sign positive
    bits = (q(x).indices[:, None] >> torch.arange(8)) & 1
    assert bool((bits.sum(0) > 0).all()) and bool((bits.sum(0) < 64).all())


def test_decorrelation_pushes_bits_that_move_together_apart():
    # Two projected values that are the same up to noise: one step on the penalty alone
    # lowers their correlation (the codebook entropy would see two balanced bits).
    torch.manual_seed(0)
    q = LFQ(2, 2, pre_norm=True, entropy_weight=0.0, decorrelation_weight=1.0)
    x = torch.randn(256, 1) @ torch.ones(1, 2) + 0.1 * torch.randn(256, 2)
    x.requires_grad_(True)
    before = float(torch.corrcoef(x.detach().T)[0, 1])
    q(x).loss.backward()
    after = float(torch.corrcoef((x - 100 * x.grad).detach().T)[0, 1])  # one descent step
    assert before > 0.98 and after < before - 0.05


def test_presets_carry_the_repairs():
    simvq = stabq.build_quantizer("simvq", DIM)
    assert simvq.pre_norm is not None and torch.equal(simvq.transform.weight, torch.eye(DIM))
    lfq = stabq.build_quantizer("lfq", DIM)
    assert lfq.pre_norm is not None and lfq.inv_temperature == 1.0
    bsq = stabq.build_quantizer("bsq", DIM)
    assert bsq.pre_norm is not None and bsq.spherical
    assert lfq.decorrelation_weight == bsq.decorrelation_weight == 1.0
    assert "pre_norm=True" in repr(simvq) and "pre_norm=True" in repr(lfq)


@pytest.mark.parametrize("name", ["simvq", "lfq", "bsq"])
def test_pre_norm_takes_only_a_boolean(name):
    with pytest.raises(ConfigError, match="pre_norm='yes', allowed is true or false"):
        stabq.build_quantizer(name, DIM, pre_norm="yes")


def test_identity_transform_takes_only_a_boolean():
    with pytest.raises(ConfigError, match="identity_transform=1, allowed is true or false"):
        stabq.build_quantizer("simvq", DIM, identity_transform=1)
