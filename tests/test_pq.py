"""ProductQuantizer: agreement with faiss both ways, brute-force search, EMA and k-means, errors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stabq import ConfigError, ProductQuantizer

COMBOS = [(16, 8, 8), (16, 4, 8), (12, 4, 4), (12, 3, 6), (10, 5, 3), (8, 8, 1), (8, 2, 10)]


def faiss_indices(f, x: torch.Tensor) -> torch.Tensor:
    """faiss compute_codes, unpacked to ``(n, M)`` int64."""
    packed = f.compute_codes(np.ascontiguousarray(x.reshape(-1, f.d).numpy(), dtype=np.float32))
    return torch.from_numpy(faiss.unpack_bitstrings(packed, f.M, f.nbits).astype(np.int64))


def brute_force(x: torch.Tensor, centroids: torch.Tensor):
    """Per subspace argmin_k |x_m - C_m[k]|^2 over all codes; ``(n, M)`` indices and codes."""
    m, _, dsub = centroids.shape
    xs = x.reshape(-1, m, dsub)
    dist = ((xs[:, :, None, :] - centroids[None]) ** 2).sum(-1)  # (n, M, K)
    idx = dist.argmin(-1)
    codes = centroids[torch.arange(m), idx].reshape(xs.shape[0], -1)
    return idx, codes, dist


@pytest.mark.parametrize(("dim", "m", "bits"), COMBOS)
def test_indices_equal_faiss_compute_codes_for_the_same_centroids(dim, m, bits):
    """pq.to_faiss() holds the same centroids: faiss's codes (unpacked) equal ours, 2-D and 3-D."""
    torch.manual_seed(dim * 100 + m * 10 + bits)
    pq = ProductQuantizer(dim, m, bits).eval()
    f = pq.to_faiss()
    assert (f.d, f.M, f.nbits) == (dim, m, bits)
    x = torch.randn(6, 50, dim)
    out = pq(x)
    assert out.indices.shape == (6, 50, m)
    expected = faiss_indices(f, x)
    assert torch.equal(out.indices.reshape(-1, m), expected)
    assert torch.equal(pq(x.reshape(-1, dim)).indices, expected)


@pytest.mark.parametrize(("dim", "m", "bits"), [(12, 4, 6), (16, 8, 8), (8, 2, 4)])
def test_on_exact_ties_both_pick_an_equally_near_code(dim, m, bits):
    """Integer data makes exact ties; whichever code faiss picks, ours is at the same distance."""
    torch.manual_seed(9)
    pq = ProductQuantizer(dim, m, bits).eval()
    with torch.no_grad():
        pq.codebook.embed.copy_(torch.randint(-2, 3, pq.codebook.embed.shape).float())
    x = torch.randint(-2, 3, (300, dim)).float()
    ours = pq(x).indices
    theirs = faiss_indices(pq.to_faiss(), x)
    _, _, dist = brute_force(x, pq.centroids)
    mine = dist.gather(2, ours[..., None])
    assert torch.equal(mine, dist.gather(2, theirs[..., None]))
    assert torch.equal(mine[..., 0], dist.min(-1).values)
    # our rule is the lowest index among the tied nearest codes
    assert torch.equal(ours, (dist == dist.min(-1, keepdim=True).values).float().argmax(-1))


@pytest.mark.parametrize(("dim", "m", "bits"), [(16, 8, 8), (12, 4, 4), (12, 3, 6), (10, 5, 3)])
def test_from_faiss_takes_a_faiss_trained_quantizer(dim, m, bits):
    """from_faiss: the same centroids, the same codes as compute_codes, decode as faiss decode."""
    rng = np.random.default_rng(bits)
    x_np = rng.standard_normal((3000, dim)).astype(np.float32)
    f = faiss.ProductQuantizer(dim, m, bits)
    f.verbose = False
    f.train(x_np)
    pq = ProductQuantizer.from_faiss(f).eval()
    expected = faiss.vector_to_array(f.centroids).reshape(m, 2**bits, dim // m)
    assert np.array_equal(pq.centroids.numpy(), expected)
    assert bool(pq.codebook.initted)
    x = torch.from_numpy(x_np[:500])
    out = pq(x)
    packed = f.compute_codes(x_np[:500])
    assert torch.equal(out.indices, faiss_indices(f, x))
    decoded = torch.from_numpy(f.decode(packed))
    torch.testing.assert_close(pq.indices_to_codes(out.indices), decoded, rtol=0, atol=1e-6)


def test_from_faiss_is_not_overwritten_by_kmeans_init():
    """Codes from faiss count as initialised: a train step with kmeans_init only EMA-nudges."""
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1000, 8)).astype(np.float32)
    f = faiss.ProductQuantizer(8, 4, 4)
    f.train(x_np)
    pq = ProductQuantizer.from_faiss(f, kmeans_init=True, decay=0.99)
    before = pq.centroids.clone()
    pq.train()(torch.from_numpy(x_np[:200]))
    assert not torch.equal(pq.centroids, before)
    assert (pq.centroids - before).abs().max() < 0.05


@pytest.mark.parametrize(("dim", "m", "bits"), [(12, 4, 6), (16, 8, 8), (6, 3, 2)])
def test_round_trip_through_faiss_keeps_centroids_exactly(dim, m, bits):
    """to_faiss -> from_faiss returns bit-identical centroids and the same indices."""
    torch.manual_seed(bits)
    pq = ProductQuantizer(dim, m, bits, kmeans_init=True)
    x = torch.randn(400, dim) * 3
    pq.train()(x)  # trained codes, not the random init
    pq.eval()
    back = ProductQuantizer.from_faiss(pq.to_faiss()).eval()
    assert torch.equal(back.centroids, pq.centroids)
    assert torch.equal(back(x).indices, pq(x).indices)
    assert np.array_equal(
        faiss.vector_to_array(back.to_faiss().centroids),
        faiss.vector_to_array(pq.to_faiss().centroids),
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(2, 5),  # m = 1 has its own test below
    dsub=st.integers(1, 4),
    bits=st.integers(1, 5),
    lead=st.sampled_from([(11,), (1,), (3, 4), (2, 1)]),
)
def test_indices_equal_brute_force_per_subspace_argmin(seed, m, dsub, bits, lead):
    """Eval indices equal the per-subspace brute-force argmin (float64: exact); shape (..., M)."""
    torch.manual_seed(seed)
    dim = m * dsub
    pq = ProductQuantizer(dim, m, bits).double().eval()
    x = torch.randn(*lead, dim, dtype=torch.float64)
    out = pq(x)
    assert out.indices.shape == (*lead, m) and out.indices.dtype == torch.int64
    idx, codes, _ = brute_force(x, pq.centroids)
    assert torch.equal(out.indices.reshape(-1, m), idx)
    assert torch.equal(pq.indices_to_codes(out.indices).reshape(-1, dim), codes)
    torch.testing.assert_close(out.quantized.reshape(-1, dim), codes, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_single_subspace_keeps_the_trailing_index_axis_and_decodes(lead):
    """num_subspaces=1: indices are still (..., 1) per the contract, and decode back."""
    torch.manual_seed(1)
    pq = ProductQuantizer(4, 1, 3).eval()
    x = torch.randn(*lead, 4)
    out = pq(x)
    assert out.indices.shape == (*lead, 1)
    torch.testing.assert_close(pq.indices_to_codes(out.indices), out.quantized, atol=1e-6, rtol=0)


def test_loss_is_commitment_and_gradient_is_straight_through():
    """loss = beta * mse(x, codes); d quantized / d x is the identity."""
    torch.manual_seed(2)
    pq = ProductQuantizer(8, 4, 3, commitment_weight=0.4).eval()
    x = torch.randn(3, 7, 8, requires_grad=True)
    out = pq(x)
    _, codes, _ = brute_force(x.detach(), pq.centroids)
    expected = 0.4 * ((x.detach().reshape(-1, 8) - codes) ** 2).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    upstream = torch.randn(3, 7, 8)
    out.quantized.backward(upstream)
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize(("dim", "m"), [(16, 3), (10, 4), (7, 2), (8, 0), (8, -2)])
def test_num_subspaces_must_divide_dim(dim, m):
    """A num_subspaces that does not divide dim is refused, naming it, its value and dim."""
    with pytest.raises(ConfigError) as info:
        ProductQuantizer(dim, m, 4)
    message = str(info.value)
    assert f"num_subspaces={m}" in message
    assert "divide" in message and f"dim={dim}" in message


@pytest.mark.parametrize("bits", [0, 17, -1, 8.0, True])
def test_bits_outside_1_to_16_are_rejected(bits):
    """bits must be an integer from 1 to 16."""
    with pytest.raises(ConfigError) as info:
        ProductQuantizer(8, 2, bits)
    assert f"bits={bits!r}" in str(info.value)


def test_ema_training_moves_codebooks_as_the_ema_formula_says_and_eval_does_not():
    """Train step: e_k = S_k / smooth(N_k) with S, N updated by decay; eval leaves codes alone."""
    torch.manual_seed(3)
    decay, k = 0.5, 8
    pq = ProductQuantizer(6, 3, 3, decay=decay)
    x = torch.randn(200, 6)
    before = pq.centroids.clone()
    pq.eval()(x)
    assert torch.equal(pq.centroids, before)
    out = pq.train()(x)
    idx, _, _ = brute_force(x, before)  # assignments use the codes before the update
    assert torch.equal(out.indices, idx)
    xs = x.double().reshape(200, 3, 2).transpose(0, 1)  # (M, n, dsub)
    onehot = torch.nn.functional.one_hot(idx.T, k).double()  # (M, n, K)
    counts, sums = onehot.sum(1), onehot.transpose(1, 2) @ xs
    size = decay * 1.0 + (1 - decay) * counts  # cluster sizes start at 1
    embed_sum = decay * before.double() + (1 - decay) * sums  # sums start at the codes
    total = size.sum(-1, keepdim=True)
    smoothed = (size + 1e-5) / (total + k * 1e-5) * total
    expected = embed_sum / smoothed[..., None]
    torch.testing.assert_close(pq.centroids.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(pq.centroids, before)


def test_kmeans_init_is_per_subspace_and_beats_random_init():
    """Subspaces at different offsets and scales: k-means init fits each, random init does not."""
    torch.manual_seed(4)
    m, dsub = 4, 3
    offsets = torch.arange(m).repeat_interleave(dsub) * 10.0
    scales = (torch.arange(m) + 1.0).repeat_interleave(dsub)
    x = torch.randn(2000, m * dsub) * scales + offsets
    km = ProductQuantizer(m * dsub, m, 5, kmeans_init=True)
    rand = ProductQuantizer(m * dsub, m, 5)
    km.train()(x)
    assert bool(km.codebook.initted)
    centre = km.centroids.mean(1)  # (M, dsub): each codebook sits on its own subspace's data
    torch.testing.assert_close(centre, offsets.reshape(m, dsub), atol=1.0, rtol=0)

    def error(pq):
        q = pq.eval()(x).quantized.detach()
        return ((x - q) ** 2).reshape(-1, m, dsub).sum(-1).mean(0)  # per subspace

    err_km, err_rand = error(km), error(rand)
    assert (err_km < err_rand).all(), (err_km, err_rand)
    f = faiss.ProductQuantizer(m * dsub, m, 5)
    f.train(x.numpy())
    err_faiss = error(ProductQuantizer.from_faiss(f))
    assert (err_km < 1.3 * err_faiss).all(), (err_km, err_faiss)  # close to faiss's training


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(20, 8), (2, 5, 8)])
def test_half_precision_input_is_accepted(dtype, shape):
    """Half input: output dtype and shape kept, the same codes as the upcast float32 input."""
    torch.manual_seed(5)
    pq = ProductQuantizer(8, 4, 4).eval()
    x = torch.randn(*shape).to(dtype)
    out = pq(x)
    ref = pq(x.float())
    assert out.quantized.dtype == dtype and out.quantized.shape == x.shape
    assert out.indices.shape == (*shape[:-1], 4)
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.quantized, ref.quantized.to(dtype))
    assert pq.train()(x).quantized.dtype == dtype
