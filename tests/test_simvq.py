"""SimVQ against vector-quantize-pytorch 1.32's SimVQ, and its k-means basis initialisation."""

from __future__ import annotations

import pytest
import torch
from vector_quantize_pytorch import SimVQ as PeerSimVQ

from stabq import ConfigError, SimVQ
from stabq.quantizers.codebook import kmeans

DIM, K = 16, 64


def pair(rotation_trick: bool) -> tuple[SimVQ, PeerSimVQ]:
    """stabq's SimVQ holding the peer's frozen basis and linear layer."""
    torch.manual_seed(0)
    peer = PeerSimVQ(dim=DIM, codebook_size=K, rotation_trick=rotation_trick)
    ours = SimVQ(DIM, K, rotation_trick=rotation_trick)
    ours.basis.copy_(peer.frozen_codebook)
    with torch.no_grad():
        ours.transform.weight.copy_(peer.code_transform.weight)
    return ours, peer


def run(module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    quantized, indices, loss = module(x)
    (quantized.square().sum() + loss).backward()
    weight = module.transform.weight if isinstance(module, SimVQ) else module.code_transform.weight
    return quantized.detach(), indices, loss.detach(), x.grad, weight.grad


def test_straight_through_simvq_equals_the_peer_bit_for_bit():
    ours, peer = pair(rotation_trick=False)
    x = torch.randn(1, 300, DIM)
    got, want = run(ours, x), run(peer, x)
    for name, a, b in zip(
        ["quantized", "indices", "loss", "x.grad", "W.grad"], got, want, strict=True
    ):
        assert torch.equal(a, b), name
    assert got[1].unique().numel() > 20  # a real assignment, not one code for all


def test_rotation_trick_simvq_differs_from_the_peer_only_by_rounding():
    # Same gradient map; stabq returns the code exactly (out + sg(q - out)), the peer its
    # rotated input, which equals the code up to rounding.
    ours, peer = pair(rotation_trick=True)
    x = torch.randn(1, 300, DIM)
    (q, idx, loss, gx, gw), (pq, pidx, ploss, pgx, pgw) = run(ours, x), run(peer, x)
    assert torch.equal(idx, pidx) and torch.equal(loss, ploss)
    codes = ours.codebook.detach()[idx]
    torch.testing.assert_close(q, codes, rtol=0, atol=1e-6)
    assert not torch.equal(pq, codes)  # the peer's value is off by rounding
    torch.testing.assert_close(q, pq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, pgx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, pgw, rtol=1e-5, atol=1e-6)


def test_every_code_gets_a_gradient_not_only_the_selected_ones():
    torch.manual_seed(0)
    q = SimVQ(DIM, K)
    _, indices, loss = q(torch.randn(8, DIM))
    assert indices.unique().numel() < K  # most codes unused in this batch...
    loss.backward()
    assert (q.transform.weight.grad != 0).all()  # ...yet the shared map moves all of them


def test_kmeans_init_sets_the_codebook_to_the_first_batch_centroids():
    torch.manual_seed(0)
    q = SimVQ(DIM, 8, init="kmeans", kmeans_iters=5)
    x = torch.randn(200, DIM)
    torch.manual_seed(1)
    want, _ = kmeans(x[None], 8, 5)
    torch.manual_seed(1)
    q(x)
    assert bool(q.initted)
    assert torch.equal(q.transform.weight, torch.eye(DIM))
    assert torch.equal(q.codebook.detach(), want[0])
    q(torch.randn(200, DIM) + 100)  # later batches do not re-initialise
    assert torch.equal(q.codebook.detach(), want[0])


def test_kmeans_init_waits_for_training_mode_and_for_rows():
    q = SimVQ(DIM, 8, init="kmeans").eval()
    q(torch.randn(50, DIM))
    assert not bool(q.initted)
    q.train()(torch.zeros(0, DIM))
    assert not bool(q.initted)


def test_init_from_features_reseeds_a_random_basis_by_kmeans():
    torch.manual_seed(0)
    q = SimVQ(DIM, 8)
    x = torch.randn(4, 50, DIM)
    torch.manual_seed(3)
    want, _ = kmeans(x.reshape(1, -1, DIM), 8, 10)
    torch.manual_seed(3)
    q.init_from_features(x)
    assert torch.equal(q.codebook.detach(), want[0])


def test_bad_init_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="init='pca', allowed is one of random, kmeans"):
        SimVQ(DIM, 8, init="pca")
