"""VectorQuantizer: nearest code, gradient estimators, EMA and learned codebooks, dtypes, errors."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stabq.errors import ConfigError, ShapeError, StabqError
from stabq.quantizers.vq import VectorQuantizer


def brute_force_indices(z, codes):
    """float64 argmin over explicit squared distances, (n, d) x (K, d) -> (n,)."""
    return ((z.double()[:, None] - codes.double()[None]) ** 2).sum(-1).argmin(-1)


def code_space(vq, x):
    """The vectors the codebook sees, computed by hand from the projection weights."""
    z = x.reshape(-1, vq.dim).float()
    if isinstance(vq.project_in, torch.nn.Linear):
        z = z @ vq.project_in.weight.T + vq.project_in.bias
    return F.normalize(z, dim=-1) if vq.cosine else z


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("codebook_dim", [None, 3])
@pytest.mark.parametrize("shape", [(40, 6), (3, 7, 6)])
def test_eval_output_is_the_nearest_code(cosine, codebook_dim, shape):
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=6, codebook_size=16, codebook_dim=codebook_dim, cosine=cosine).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        q, idx, loss = vq(x)
        assert idx.dtype == torch.int64 and idx.shape == shape[:-1]
        assert q.shape == shape
        z = code_space(vq, x)
        want = brute_force_indices(z, vq.codes)
        assert torch.equal(idx.reshape(-1), want)
        torch.testing.assert_close(loss, 0.25 * ((z - vq.codes[want]) ** 2).mean())
        torch.testing.assert_close(q, vq.indices_to_codes(idx))
        chosen = vq.codes[want]
        if codebook_dim is not None:
            chosen = chosen @ vq.project_out.weight.T + vq.project_out.bias
        # close, not equal: straight-through computes x + (q - x), which rounds
        torch.testing.assert_close(q.reshape(-1, 6), chosen)


@settings(max_examples=30, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    k=st.integers(1, 12),
    dim=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_eval_indices_match_brute_force_for_any_leading_shape(lead, k, dim, seed):
    torch.manual_seed(seed)
    vq = VectorQuantizer(dim=dim, codebook_size=k).eval()
    # integer-valued input: float32 distances exact, ties to the lowest index
    x = torch.randint(-3, 4, (*lead, dim)).float()
    vq.codebook.embed.copy_(torch.randint(-3, 4, (1, k, dim)).float())
    q, idx, loss = vq(x)
    assert idx.shape == tuple(lead) and idx.dtype == torch.int64
    assert torch.equal(idx.reshape(-1), brute_force_indices(x.reshape(-1, dim), vq.codes))
    assert torch.equal(q, vq.indices_to_codes(idx))
    want_loss = 0.25 * ((x - q) ** 2).mean() if x.numel() else torch.tensor(0.0)
    torch.testing.assert_close(loss, want_loss)


def test_commitment_loss_equals_beta_times_mse_to_the_chosen_code():
    torch.manual_seed(2)
    vq = VectorQuantizer(dim=4, codebook_size=8, commitment_weight=0.7).eval()
    x = torch.randn(20, 4)
    _, idx, loss = vq(x)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, 0.7 * ((x - vq.codes[idx]) ** 2).mean())


@pytest.mark.parametrize("training", [False, True])
def test_straight_through_gradient_is_identity(training):
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=5, codebook_size=8).train(training)
    x = torch.randn(12, 5, requires_grad=True)
    q, _, _ = vq(x)
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_rotation_trick_keeps_the_value_and_rotates_the_gradient():
    torch.manual_seed(0)
    plain = VectorQuantizer(dim=5, codebook_size=8).eval()
    rot = VectorQuantizer(dim=5, codebook_size=8, rotation_trick=True).eval()
    rot.load_state_dict(plain.state_dict())
    x = torch.randn(12, 5, requires_grad=True)
    q, idx, _ = rot(x)
    q_plain, idx_plain, _ = plain(x.detach())
    assert torch.equal(idx, idx_plain)
    torch.testing.assert_close(q, q_plain)
    q.sum().backward()
    assert not torch.allclose(x.grad, torch.ones_like(x), atol=1e-2)
    # lambda R with R orthogonal: |grad_i| = |q_i| / |x_i| * |ones|
    want = q_plain.norm(dim=-1) / x.detach().norm(dim=-1) * 5**0.5
    torch.testing.assert_close(x.grad.norm(dim=-1), want, rtol=1e-5, atol=1e-5)


def test_ema_codebook_moves_towards_the_data_in_training():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8)
    x = 3.0 + 0.1 * torch.randn(64, 4)
    vq.eval()
    before = ((x - vq(x).quantized) ** 2).sum(-1).mean().item()
    vq.train()
    for _ in range(20):
        vq(x)
    vq.eval()
    after = ((x - vq(x).quantized) ** 2).sum(-1).mean().item()
    assert after < 0.25 * before


def test_eval_forward_changes_no_buffer():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8, kmeans_init=True, dead_code_threshold=2.0)
    vq.eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    for _ in range(3):
        vq(torch.randn(30, 4))
    for key, value in vq.state_dict().items():
        assert torch.equal(value, state[key]), key
    vq.train()(torch.randn(30, 4))  # the same call in training does change them
    assert not torch.equal(vq.state_dict()["codebook.embed"], state["codebook.embed"])


def test_ema_codebook_is_a_buffer_not_a_parameter():
    vq = VectorQuantizer(dim=4, codebook_size=8)
    assert "codebook.embed" in dict(vq.named_buffers())
    assert "codebook.embed" not in dict(vq.named_parameters())
    assert list(vq.parameters()) == []


def test_learned_codebook_is_a_parameter_and_gets_the_codebook_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=3, codebook_size=6, decay=None, commitment_weight=0.25)
    embed = vq.codebook.embed
    assert isinstance(embed, torch.nn.Parameter)
    assert "codebook.embed" in dict(vq.named_parameters())
    x = torch.randn(10, 3)
    codes_before = embed.detach()[0].clone()
    _, idx, loss = vq.train()(x)
    loss.backward()
    # d/de_k of mean((e - sg(z))^2) over n*d elements: 2 * sum_{i: k_i = k} (e_k - z_i) / (n d)
    want = torch.zeros(6, 3)
    want.index_add_(0, idx, 2 * (codes_before[idx] - x) / x.numel())
    torch.testing.assert_close(embed.grad[0], want)
    assert embed.grad[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_gives_same_indices_and_its_own_dtype(dtype):
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=6, codebook_size=16, codebook_dim=4).eval()
    x = torch.randn(2, 9, 6).to(dtype)
    q, idx, loss = vq(x)
    q32, idx32, _ = vq(x.float())
    assert q.dtype == dtype and q.shape == x.shape
    assert torch.equal(idx, idx32)
    assert torch.equal(q, q32.to(dtype))
    assert torch.isfinite(loss) and loss.dtype == torch.float32


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 9), (5,)])
def test_wrong_last_dimension_raises_shape_error_naming_both(shape):
    vq = VectorQuantizer(dim=8, codebook_size=4)
    with pytest.raises(ShapeError) as info:
        vq(torch.randn(*shape))
    message = str(info.value)
    assert isinstance(info.value, StabqError) and isinstance(info.value, ValueError)
    assert "dim=8" in message and str(shape[-1]) in message and str(shape) in message


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_input_is_rejected(dtype):
    vq = VectorQuantizer(dim=3, codebook_size=4)
    with pytest.raises(ShapeError, match="floating-point"):
        vq(torch.ones(4, 3, dtype=dtype))


def test_quantization_disabled_passes_input_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8, kmeans_init=True)
    vq.quantization_enabled = False
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    x = torch.randn(3, 5, 4, requires_grad=True)
    q, idx, loss = vq(x)
    assert torch.equal(q, x)
    assert idx.shape == (3, 5) and idx.dtype == torch.int64
    assert torch.equal(idx, torch.full((3, 5), -1))
    assert loss.dim() == 0 and loss.item() == 0.0
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert all(torch.equal(v, state[k]) for k, v in vq.state_dict().items())


def test_vanilla_defaults():
    params = inspect.signature(VectorQuantizer).parameters
    assert params["codebook_dim"].default is None
    assert params["decay"].default == 0.99
    assert params["commitment_weight"].default == 0.25
    assert params["kmeans_init"].default is False
    assert params["kmeans_iters"].default == 10
    assert params["dead_code_threshold"].default == 0.0
    assert params["cosine"].default is False
    assert params["rotation_trick"].default is False
    vq = VectorQuantizer(dim=8, codebook_size=32)
    book = vq.codebook
    assert (vq.dim, vq.codebook_size, vq.num_codebooks) == (8, 32, 1)
    assert book.decay == 0.99 and vq.commitment_weight == 0.25
    assert book.kmeans_init is False and bool(book.initted)
    assert book.dead_code_threshold == 0.0 and book.cosine is False and vq.cosine is False
    assert vq.rotation_trick is False and vq.quantization_enabled is True
    assert isinstance(vq.project_in, torch.nn.Identity)
    assert vq.codes.shape == (32, 8)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"codebook_size": 0}, "codebook_size=0"),
        ({"dim": 0}, "dim=0"),
        ({"decay": 1.0}, "decay=1.0"),
        ({"commitment_weight": -1.0}, "commitment_weight=-1.0"),
        ({"codebook_dim": 0}, "codebook_dim=0"),
        ({"dead_code_threshold": -2}, "dead_code_threshold=-2"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, name):
    with pytest.raises(ConfigError) as info:
        VectorQuantizer(**{"dim": 4, "codebook_size": 8, **kwargs})
    assert name in str(info.value) and "VectorQuantizer" in str(info.value)


def test_indices_to_codes_rejects_out_of_range_indices():
    vq = VectorQuantizer(dim=4, codebook_size=8)
    with pytest.raises(ShapeError, match="0, 7"):
        vq.indices_to_codes(torch.tensor([0, 8]))
    with pytest.raises(ShapeError):
        vq.indices_to_codes(torch.tensor([-1]))
