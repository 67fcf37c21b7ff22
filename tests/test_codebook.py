"""Codebook pieces: chunked search, EMA update, dead codes, k-means, gradient estimators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stabq.quantizers.codebook as cb
from stabq.errors import ConfigError, StabqError
from stabq.quantizers.codebook import (
    DEFAULT_CHUNK_ELEMENTS,
    Codebook,
    commitment_loss,
    kmeans,
    nearest_code,
    rotation_trick,
    straight_through,
)


def brute_force(x, c):
    """float64 ((x - c)^2).sum(-1) over (G, N, K); numpy argmin (first minimum on ties)."""
    d = ((x.double()[:, :, None] - c.double()[:, None]) ** 2).sum(-1).numpy()
    return torch.from_numpy(d.argmin(-1)), torch.from_numpy(d.min(-1))


@st.composite
def search_problem(draw):
    g, n, k, d = (draw(st.integers(lo, hi)) for lo, hi in [(1, 3), (1, 12), (1, 10), (1, 4)])
    small = st.integers(-4, 4)
    x = draw(hnp.arrays(np.int8, (g, n, d), elements=small))
    c = draw(hnp.arrays(np.int8, (g, k, d), elements=small))
    chunk = draw(
        st.sampled_from([1, 2, 3, k - 1, k, k + 1, g * k, g * k - 1, g * n * k, 2**23])
        | st.integers(1, 200)
    )
    return torch.from_numpy(x).float(), torch.from_numpy(c).float(), max(1, chunk)


@settings(max_examples=150, deadline=None)
@given(search_problem())
def test_nearest_code_equals_brute_force_with_ties_to_lowest_index(problem):
    # integer inputs in [-4, 4]: float32 is exact, so ties are real and must match numpy argmin
    x, c, chunk = problem
    idx, dist = nearest_code(x, c, chunk_elements=chunk)
    want_idx, want_dist = brute_force(x, c)
    assert idx.dtype == torch.int64 and idx.shape == x.shape[:2]
    assert torch.equal(idx, want_idx)
    assert torch.equal(dist.double(), want_dist)


@settings(max_examples=40, deadline=None)
@given(search_problem())
def test_nearest_code_two_dim_form_equals_the_grouped_form(problem):
    x, c, chunk = problem
    idx, dist = nearest_code(x[0], c[0], chunk_elements=chunk)
    assert idx.shape == (x.shape[1],)
    assert torch.equal(idx, brute_force(x[:1], c[:1])[0][0])
    assert torch.equal(dist.double(), brute_force(x[:1], c[:1])[1][0])


def test_nearest_code_all_codes_equal_picks_index_zero_across_chunks():
    x = torch.randn(1, 7, 3)
    c = torch.ones(1, 9, 3)
    for chunk in (1, 2, 4, 9, 100):
        idx, _ = nearest_code(x, c, chunk_elements=chunk)
        assert torch.equal(idx, torch.zeros(1, 7, dtype=torch.long))


@pytest.mark.parametrize("chunk", [1, 5, 17, 64, 2**23])
def test_nearest_code_on_random_floats_finds_the_minimum_distance(chunk):
    gen = torch.Generator().manual_seed(chunk)
    x, c = torch.randn(2, 50, 6, generator=gen), torch.randn(2, 33, 6, generator=gen)
    idx, dist = nearest_code(x, c, chunk_elements=chunk)
    full = ((x.double()[:, :, None] - c.double()[:, None]) ** 2).sum(-1)
    best = full.min(-1).values
    chosen = full.gather(-1, idx[..., None])[..., 0]
    assert torch.all((chosen - best).abs() <= 1e-4 * best.clamp_min(1e-6))
    torch.testing.assert_close(dist.double(), chosen, rtol=1e-4, atol=1e-5)


def test_nearest_code_runs_without_autograd():
    x = torch.randn(1, 10, 4, requires_grad=True)
    c = torch.randn(1, 6, 4, requires_grad=True)
    idx, dist = nearest_code(x, c)
    assert not idx.requires_grad and not dist.requires_grad
    assert dist.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nearest_code_searches_half_precision_in_float32(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 5, generator=gen).to(dtype)
    c = torch.randn(2, 20, 5, generator=gen).to(dtype)
    idx, dist = nearest_code(x, c, chunk_elements=30)
    want_idx, want_dist = nearest_code(x.float(), c.float(), chunk_elements=30)
    assert dist.dtype == torch.float32
    assert torch.equal(idx, want_idx) and torch.equal(dist, want_dist)


@pytest.mark.parametrize("chunk", [64, 100, 999])
def test_nearest_code_never_builds_a_tile_larger_than_chunk_elements(monkeypatch, chunk):
    # K > chunk and N * K >> chunk: every distance tile made by baddbmm stays within the bound
    sizes = []
    real = torch.baddbmm

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "baddbmm", spy)
    gen = torch.Generator().manual_seed(chunk)
    x, c = (
        torch.randint(-3, 4, (1, 300, 4), generator=gen),
        torch.randint(-3, 4, (1, 1500, 4), generator=gen),
    )
    idx, dist = nearest_code(x.float(), c.float(), chunk_elements=chunk)
    monkeypatch.undo()
    assert len(sizes) > 1 and max(sizes) <= chunk
    want_idx, want_dist = brute_force(x.float(), c.float())
    assert torch.equal(idx, want_idx) and torch.equal(dist.double(), want_dist)


def test_nearest_code_at_full_scale_tiles_instead_of_building_the_full_matrix(monkeypatch):
    # 65,536 inputs x 65,536 codes of 128 dims: record the first tile and stop before computing
    shapes = []

    class Stop(Exception):
        pass

    def spy(bias, a, b, **kwargs):
        shapes.append((a.shape[0], a.shape[1], b.shape[2]))
        raise Stop

    monkeypatch.setattr(torch, "baddbmm", spy)
    x, c = torch.zeros(65536, 128), torch.zeros(65536, 128)
    with pytest.raises(Stop):
        nearest_code(x, c)
    g, rows, codes = shapes[0]
    assert g * rows * codes <= DEFAULT_CHUNK_ELEMENTS < 65536 * 65536


def test_ema_update_matches_a_hand_computation():
    book = Codebook(codebook_size=3, dim=2, decay=0.9, eps=0.1)
    book.embed_sum.copy_(torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]]))
    book.cluster_size.copy_(torch.tensor([[2.0, 1.0, 0.5]]))
    x = torch.tensor([[[1.0, 1.0], [3.0, 1.0], [0.0, 2.0]]])
    book.update(x, torch.tensor([[0, 0, 2]]))
    # n = [2, 0, 1]; N = 0.9 [2, 1, 0.5] + 0.1 n = [2.0, 0.9, 0.55], sum N = 3.45
    # S = 0.9 S + 0.1 s with s = [[4, 2], [0, 0], [0, 2]]
    # smoothed N_k = (N_k + 0.1) / (3.45 + 0.3) * 3.45 = (N_k + 0.1) * 0.92 = [1.932, 0.92, 0.598]
    n = torch.tensor([[2.0, 0.9, 0.55]])
    s = torch.tensor([[[1.3, 0.2], [0.0, 1.8], [2.7, 2.9]]])
    e = torch.tensor([[[1.3 / 1.932, 0.2 / 1.932], [0.0, 1.8 / 0.92], [2.7 / 0.598, 2.9 / 0.598]]])
    torch.testing.assert_close(book.cluster_size, n, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(book.embed_sum, s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(book.embed, e, rtol=1e-6, atol=1e-6)


def test_learned_codebook_update_moves_counts_but_not_codes():
    book = Codebook(codebook_size=2, dim=2, decay=None, usage_decay=0.5)
    before = book.embed.detach().clone()
    book.update(torch.ones(1, 3, 2), torch.tensor([[1, 1, 1]]))
    assert isinstance(book.embed, torch.nn.Parameter)
    assert torch.equal(book.embed.detach(), before)
    torch.testing.assert_close(book.cluster_size, torch.tensor([[0.5, 2.0]]))


def starved_codebook(threshold=0.6):
    """Codes 1..3 get no assignments for two updates: N = 0.5^2 = 0.25, so over the
    EMA horizon of 1 / (1 - 0.5) = 2 batches they count 0.5 assignments < threshold."""
    book = Codebook(codebook_size=4, dim=2, decay=0.5, dead_code_threshold=threshold)
    book.embed.copy_(torch.tensor([[[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]]]))
    book.embed_sum.copy_(book.embed)
    x = torch.tensor([[[1.0, 2.0], [-1.0, 0.5], [2.0, -1.0], [0.5, 0.5], [-2.0, 1.0]]])
    for _ in range(2):
        book.update(x, torch.zeros(1, 5, dtype=torch.long))
    return book, x


def test_replace_dead_codes_moves_exactly_the_dead_codes_onto_batch_rows():
    torch.manual_seed(0)
    book, x = starved_codebook()
    assert book.horizon == 2.0
    dead = book.cluster_size[0] * book.horizon < 0.6
    assert dead.tolist() == [False, True, True, True]
    live_code, live_size, live_sum = (
        book.embed[0, 0].clone(),
        book.cluster_size[0, 0].clone(),
        book.embed_sum[0, 0].clone(),
    )
    assert book.replace_dead_codes(x) == 3
    assert torch.equal(book.embed[0, 0], live_code)
    assert torch.equal(book.cluster_size[0, 0], live_size)
    assert torch.equal(book.embed_sum[0, 0], live_sum)
    for k in (1, 2, 3):
        code = book.embed[0, k]
        assert (x[0] == code).all(-1).any(), f"code {k} = {code} is not a batch row"
    # restart at threshold / horizon = 0.3 per batch, 0.6 over the horizon: not dead any more
    torch.testing.assert_close(book.cluster_size[0, 1:], torch.full((3,), 0.3))
    torch.testing.assert_close(book.embed_sum[0, 1:], 0.3 * book.embed[0, 1:])
    assert book.replace_dead_codes(x) == 0


def test_replace_dead_codes_with_no_dead_code_changes_nothing():
    book = Codebook(codebook_size=3, dim=2, dead_code_threshold=0.5)
    state = {k: v.clone() for k, v in book.state_dict().items()}
    assert book.replace_dead_codes(torch.randn(1, 4, 2)) == 0
    assert all(torch.equal(v, state[k]) for k, v in book.state_dict().items())


def test_training_forward_replaces_dead_codes_and_eval_forward_changes_nothing():
    torch.manual_seed(1)
    book, x = starved_codebook(threshold=1.2)  # N * horizon = 0.5 for codes 1..3: dead
    book.cluster_size[0, 0] = 10.0
    book.eval()
    state = {k: v.clone() for k, v in book.state_dict().items()}
    book(x)
    assert all(torch.equal(v, state[k]) for k, v in book.state_dict().items())
    book.train()
    codes, idx = book(x)
    assert torch.equal(idx, torch.zeros(1, 5, dtype=torch.long))
    assert torch.equal(codes, state["embed"][:, [0] * 5])  # codes as they stood before the update
    for k in (1, 2, 3):
        assert (x[0] == book.embed[0, k]).all(-1).any()
    torch.testing.assert_close(book.cluster_size[0, 1:], torch.full((3,), 0.6))  # 1.2 / 2
    torch.testing.assert_close(book.embed_sum[0, 1:], 0.6 * book.embed[0, 1:])
    assert book.cluster_size[0, 0] > 0.6


def blobs(seed, per=40, centers=4, d=3, spread=0.3, scale=20.0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(centers, d, generator=gen) * scale
    x = mu.repeat_interleave(per, 0) + spread * torch.randn(centers * per, d, generator=gen)
    return x[torch.randperm(len(x), generator=gen)]


def mse_to_nearest(x, codes):
    return nearest_code(x, codes)[1].mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_init_lowers_quantization_error_against_random_init(seed):
    torch.manual_seed(seed)
    x = blobs(seed)[None]
    rand = Codebook(codebook_size=4, dim=3)
    km = Codebook(codebook_size=4, dim=3, kmeans_init=True, kmeans_iters=10)
    err_rand = mse_to_nearest(x[0], rand.embed[0])
    assert not bool(km.initted)
    km.train()(x)
    assert bool(km.initted)
    err_km = mse_to_nearest(x[0], km.embed[0])
    assert err_km < 0.5 * err_rand


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_centroids_are_the_means_of_their_assigned_points(seed):
    torch.manual_seed(seed)
    x = blobs(seed, centers=5)[None]
    centroids, counts = kmeans(x, 5, iters=25)
    idx, _ = nearest_code(x, centroids)
    assert torch.equal(counts[0], torch.bincount(idx[0], minlength=5).float())
    for k in range(5):
        members = x[0][idx[0] == k]
        if len(members):
            torch.testing.assert_close(centroids[0, k], members.mean(0), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_kmeans_one_centroid_one_step_is_the_mean(n, d, seed):
    # whichever row seeds it, one Lloyd step with k = 1 lands on the mean of all rows
    torch.manual_seed(seed)
    x = torch.randint(-4, 5, (2, n, d)).double()
    centroids, counts = kmeans(x, 1, iters=1)
    torch.testing.assert_close(centroids[:, 0], x.mean(1))
    assert torch.equal(counts, torch.full((2, 1), float(n), dtype=torch.float64))


def test_cosine_codebook_keeps_unit_codes_through_init_update_and_replacement():
    torch.manual_seed(0)
    book = Codebook(4, 3, decay=0.5, kmeans_init=True, dead_code_threshold=0.5, cosine=True)
    x = F.normalize(blobs(0, per=10, centers=2, d=3), dim=-1)[None]
    for _ in range(4):
        book(x)
        torch.testing.assert_close(book.embed.norm(dim=-1), torch.ones(1, 4))
    book.cluster_size.fill_(0.0)
    book.cluster_size[0, 0] = 10.0
    assert book.replace_dead_codes(3 * x) == 3
    for k in (1, 2, 3):  # replaced by a normalised batch row
        assert torch.isclose(book.embed[0, k], x[0], atol=1e-6).all(-1).any()


def test_init_from_sets_kmeans_centroids_and_matching_statistics():
    x = blobs(5, per=15, centers=3)[None]
    torch.manual_seed(7)
    want, counts = kmeans(x, 3, iters=6)
    book = Codebook(codebook_size=3, dim=3, kmeans_iters=6)
    torch.manual_seed(7)  # the same seed rows as the reference call
    book.init_from(x)
    assert torch.equal(book.embed, want) and bool(book.initted)
    assert torch.equal(book.cluster_size, counts.clamp_min(1))
    torch.testing.assert_close(book.embed_sum, want * counts.clamp_min(1)[..., None])


def test_fewer_rows_than_codes_kmeans_and_replacement_reuse_rows():
    torch.manual_seed(0)
    x = torch.tensor([[[1.0, 2.0], [5.0, -1.0]]])
    centroids, counts = kmeans(x, 5, iters=3)
    assert centroids.shape == (1, 5, 2) and counts.sum() == 2
    assert all((x[0] == c).all(-1).any() for c in centroids[0])
    book = Codebook(codebook_size=6, dim=2, dead_code_threshold=1.0)
    book.cluster_size.fill_(0.0)
    assert book.replace_dead_codes(x) == 6
    assert all((x[0] == c).all(-1).any() for c in book.embed[0])


def test_kmeans_runs_only_on_the_first_training_batch(monkeypatch):
    calls = []
    real = cb.kmeans

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cb, "kmeans", counting)
    book = Codebook(codebook_size=3, dim=2, kmeans_init=True)
    book.eval()(torch.randn(1, 10, 2))
    assert calls == [] and not bool(book.initted)  # eval never initialises
    book.train()
    book(torch.randn(1, 10, 2))
    book(torch.randn(1, 10, 2))
    book(torch.randn(1, 10, 2))
    assert calls == [1] and bool(book.initted)


def test_rotation_trick_value_and_gradient_match_an_explicit_rotation():
    gen = torch.Generator().manual_seed(0)
    d = 5
    x = torch.randn(4, d, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(4, d, generator=gen, dtype=torch.float64) * 3
    g = torch.randn(4, d, generator=gen, dtype=torch.float64)
    out = rotation_trick(x, q)
    torch.testing.assert_close(out, q)
    (out * g).sum().backward()
    eye = torch.eye(d, dtype=torch.float64)
    for i in range(4):
        xi = x[i].detach()
        u, v = xi / xi.norm(), q[i] / q[i].norm()
        w = (u + v) / (u + v).norm()
        r = eye - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)
        torch.testing.assert_close(r @ u, v)
        torch.testing.assert_close(r.T @ r, eye)
        lam = q[i].norm() / xi.norm()
        torch.testing.assert_close(x.grad[i], lam * r.T @ g[i])
        assert not torch.allclose(x.grad[i], g[i], atol=1e-3)


def test_straight_through_value_is_q_and_gradient_is_identity():
    x = torch.randn(6, 3, requires_grad=True)
    q = torch.randn(6, 3)
    g = torch.randn(6, 3)
    out = straight_through(x, q)
    torch.testing.assert_close(out, q)
    (out * g).sum().backward()
    assert torch.equal(x.grad, g)


def test_commitment_loss_matches_hand_values_and_gradients():
    z0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    c0 = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # mse(z, c) = (1 + 0 + 4 + 9) / 4 = 3.5
    z, c = z0.clone().requires_grad_(), c0.clone().requires_grad_()
    loss = commitment_loss(z, c, weight=0.25, learned=False)
    assert loss.item() == 0.875
    loss.backward()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z0 - c0) / 4)
    assert c.grad is None  # EMA codebook: no gradient to the codes
    z, c = z0.clone().requires_grad_(), c0.clone().requires_grad_()
    loss = commitment_loss(z, c, weight=0.25, learned=True)
    assert loss.item() == 0.875 + 3.5
    loss.backward()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z0 - c0) / 4)  # only the commitment term
    torch.testing.assert_close(c.grad, 2 * (c0 - z0) / 4)  # only the codebook term


def test_commitment_loss_is_float32_and_zero_for_empty_input():
    loss = commitment_loss(torch.ones(2, 2, dtype=torch.float16), torch.zeros(2, 2), 1.0, True)
    assert loss.dtype == torch.float32 and loss.item() == 2.0
    assert commitment_loss(torch.zeros(0, 3), torch.zeros(0, 3), 0.25, True).item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "name", "shown"),
    [
        ({"codebook_size": 0}, "codebook_size", "0"),
        ({"codebook_size": -3}, "codebook_size", "-3"),
        ({"codebook_size": 2.5}, "codebook_size", "2.5"),
        ({"decay": 1.0}, "decay", "1.0"),
        ({"decay": -0.1}, "decay", "-0.1"),
        ({"decay": 1.5}, "decay", "1.5"),
        ({"kmeans_iters": 0}, "kmeans_iters", "0"),
        ({"dead_code_threshold": -1.0}, "dead_code_threshold", "-1.0"),
    ],
)
def test_constructor_rejects_bad_arguments_naming_them(kwargs, name, shown):
    args = {"codebook_size": 4, "dim": 2, **kwargs}
    with pytest.raises(ConfigError) as info:
        Codebook(**args)
    assert isinstance(info.value, StabqError) and isinstance(info.value, ValueError)
    assert f"{name}={shown}" in str(info.value)


def test_constructor_accepts_boundary_values():
    Codebook(codebook_size=1, dim=1, decay=0.0, kmeans_iters=1, dead_code_threshold=0)
    Codebook(codebook_size=2, dim=1, decay=None)


def test_rotation_trick_passes_a_zero_row_straight_through():
    """A zero input row has no direction to rotate: its gradient is the identity, not 1e12."""
    x = torch.zeros(2, 4)
    x[1] = torch.tensor([1.0, 2.0, 0.0, -1.0])
    x.requires_grad_()
    q = torch.ones(2, 4)
    out = rotation_trick(x, q)
    torch.testing.assert_close(out.detach(), q)
    out.sum().backward()
    assert torch.equal(x.grad[0], torch.ones(4))
    assert torch.isfinite(x.grad).all() and not torch.equal(x.grad[1], torch.ones(4))


def test_dead_codes_are_counted_over_the_ema_horizon_not_per_batch():
    """A code taking 1 input a batch is alive at threshold 2 (10 over a 10-batch horizon);
    a code taking none is dead. A per-batch count would have killed both."""
    book = Codebook(codebook_size=3, dim=1, decay=0.9, dead_code_threshold=2.0)
    book.embed.copy_(torch.tensor([[[0.0], [10.0], [20.0]]]))
    book.embed_sum.copy_(book.embed)
    x = torch.tensor([[[0.0], [0.1], [0.2], [10.0]]])
    idx = torch.tensor([[0, 0, 0, 1]])
    for _ in range(40):
        book.update(x, idx)
    assert book.horizon == pytest.approx(10.0)
    assert book.cluster_size[0, 1] == pytest.approx(1.0, abs=0.02)  # one input per batch
    before = book.embed.clone()
    assert book.replace_dead_codes(x) == 1
    assert torch.equal(book.embed[0, :2], before[0, :2])  # codes 0 and 1 live on
    assert not torch.equal(book.embed[0, 2], before[0, 2])
