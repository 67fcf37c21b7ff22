"""ResidualFSQ against vector-quantize-pytorch 1.32's ResidualFSQ, and its residual grid."""

from __future__ import annotations

import pytest
import torch
from vector_quantize_pytorch import ResidualFSQ as PeerResidualFSQ

from stabq import ConfigError, ResidualFSQ


@pytest.mark.parametrize(
    ("levels", "num_quantizers", "dim"),
    [([8, 5, 5, 5], 4, None), ([2, 3, 4], 3, 12), ([7, 5, 5, 5, 5], 2, 16)],
)
def test_codes_indices_and_gradients_equal_the_peer(levels, num_quantizers, dim):
    torch.manual_seed(0)
    peer = PeerResidualFSQ(levels=levels, num_quantizers=num_quantizers, dim=dim)
    ours = ResidualFSQ(levels, num_quantizers, dim=dim)
    ours.load_state_dict(peer.state_dict())  # the projections, where there are any
    x = torch.randn(1, 400, dim or len(levels)) * 2
    outputs = []
    for module in (ours, peer):
        xi = x.clone().requires_grad_(True)
        quantized, indices = module(xi)[:2]
        quantized.square().sum().backward()
        outputs.append((quantized.detach(), indices.long(), xi.grad))
    for name, a, b in zip(["quantized", "indices", "x.grad"], *outputs, strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(ours(x).loss, torch.zeros(()))
    with torch.no_grad():
        decoded = peer.get_output_from_indices(outputs[1][1])
    torch.testing.assert_close(ours.indices_to_codes(outputs[0][1]), decoded, rtol=0, atol=1e-6)


def test_each_layer_quantizes_the_last_residual_on_a_grid_l_times_finer():
    q = ResidualFSQ([5], num_quantizers=3)
    # z = c tanh(x / c) with c = 1.25; pick x so that z = 0.3 exactly enough
    z = torch.tensor([[0.3]])
    x = torch.atanh(z / 1.25) * 1.25
    quantized, indices, _ = q(x)
    # layer 1: grid {-1,-.5,0,.5,1}: 0.5 (k=3), residual -0.2; layer 2 (scale 1/5):
    # -0.2 * 5 = -1 -> k=0, code -0.2, residual 0; layer 3: 0 -> k=2, code 0.
    assert indices.tolist() == [[3, 0, 2]]
    torch.testing.assert_close(quantized, torch.tensor([[0.3]]), rtol=0, atol=1e-6)


def test_each_layer_cuts_the_error_l_fold():
    # z = c tanh(x / c) reaches 1 + 1/(L - 1) = 1.25 for L = 5: layer 1 leaves at most
    # 0.25, and layer i + 1 at most 1/L of what layer i left.
    torch.manual_seed(0)
    x = torch.randn(2000, 4) * 3
    z = torch.tanh(x / 1.25) * 1.25
    errors = [float((ResidualFSQ([5] * 4, n)(x).quantized - z).abs().max()) for n in (1, 2, 3)]
    for error, bound in zip(errors, [0.25, 0.05, 0.01], strict=True):
        assert bound * 0.9 < error <= bound + 1e-6


def test_pre_norm_keeps_a_grown_projection_off_the_corners():
    torch.manual_seed(0)
    x = torch.randn(512, 16) * 1e6  # as if the projection had grown a million-fold
    plain = ResidualFSQ([8, 5, 5, 5], 2, dim=16).eval()
    normed = ResidualFSQ([8, 5, 5, 5], 2, dim=16, pre_norm=True).train()
    first_plain = plain(x).indices[:, 0].unique().numel()
    first_normed = normed(x).indices[:, 0].unique().numel()
    assert first_plain <= 16  # every dimension saturated: corners only (2^4 of them)
    assert first_normed > 100


def test_bad_levels_name_the_value():
    with pytest.raises(ConfigError, match=r"levels=\[1, 4\], allowed"):
        ResidualFSQ([1, 4])
    with pytest.raises(ConfigError, match="num_quantizers=0, allowed"):
        ResidualFSQ([4, 4], 0)
