"""The codebook pieces VQ, residual VQ and product quantization share.

Shapes: a codebook holds ``G`` groups (1 for VQ, one per subspace for PQ) of
``K`` codes of size ``d``; inputs arrive as ``(G, N, d)``.

- :func:`nearest_code`: argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k),
  computed tile by tile so at most ``chunk_elements`` distances exist at once,
  in float32 (float64 for float64 codebooks), without autograd.
- :func:`assignment_statistics`: per-code counts ``n_k`` and sums ``s_k``.
- EMA update (van den Oord et al. 2017, Sonnet's VectorQuantizerEMA)::

      N_k <- decay * N_k + (1 - decay) * n_k
      S_k <- decay * S_k + (1 - decay) * s_k
      e_k  = S_k / ((N_k + eps) / (sum N + K eps) * sum N)     (Laplace smoothing)

- :func:`kmeans`: Lloyd's algorithm, used to initialise from the first batch.
- Dead codes: ``N_k`` is the expected number of assignments per batch, so
  ``N_k * H`` counts a code's assignments over the EMA horizon of
  ``H = 1 / (1 - decay)`` batches (100 at decay 0.99). A code with
  ``N_k * H < dead_code_threshold`` is moved onto a random input of the current
  batch and its statistics restart at ``N_k = threshold / H, S_k = N_k * e_k``.
  (Counting per horizon rather than per batch matters for classifiers: with
  batches of 128 and 512 codes the average code gets 0.25 assignments a batch,
  so a per-batch threshold of 2 would re-seed nearly every code at every step;
  measured here, that cost the repaired VQ 13 points of mnist1d accuracy.)
- Under torch.distributed (see :mod:`stabq.distributed`) every rank keeps the
  same codebook: counts and sums are summed over ranks before the EMA update;
  k-means runs on the union of the ranks' first batches and dead codes are
  re-seeded from the union of their current batches, each result broadcast from
  rank 0; the dead-code mask is rank 0's. Every rank must call ``forward`` in
  training mode the same number of times (an empty ``(G, 0, d)`` batch is fine).
- How gradients pass from a code back to its input, and the commitment losses, are in
  :mod:`stabq.quantizers.gradients` (re-exported here under their earlier path).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stabq import distributed
from stabq.errors import check, is_int
from stabq.quantizers.gradients import (  # noqa: F401  (their earlier path)
    REDUCTIONS,
    commitment_loss,
    estimate,
    l2norm,
    residual_commitment_loss,
    rotation_trick,
    straight_through,
)

# 4 MiB of float32 distances per tile: small enough to stay in cache between the matrix
# product and the argmin. Measured on 2 CPU cores (torch 2.13), 2^20 took 36-46 ms at
# 16,384 x 1,024 x 128 where 2^23 took 80 ms (benchmarks/quantizers.py).
DEFAULT_CHUNK_ELEMENTS = 2**20
MIN_TILE_ROWS = 256  # codes are split into chunks so that a tile keeps at least this many rows
CLUSTER_SIZE_INITS = ("ones", "zeros")  # "zeros" reproduces the failure (Sonnet #272)


@torch.no_grad()
def nearest_code(
    x: Tensor, codes: Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, distances: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Nearest code in squared Euclidean distance, ties to the lowest index.

    Memory: besides the ``(G, N)`` results and ``(G, K)`` code norms, no
    temporary holds more than about ``chunk_elements`` numbers and at most two
    exist at once, whatever N and K (benchmarks/quantizers.py --sweep measures it).

    Args:
        x: ``(G, N, d)`` inputs (or ``(N, d)`` with ``codes`` ``(K, d)``).
        codes: ``(G, K, d)`` codebooks.
        chunk_elements: bound on the distances held at once (all groups together;
            at least one per group).
        distances: False skips the distances (``sq_dist`` is then None): the indices
            alone cost one reduction and one addition fewer.
    Returns:
        ``indices`` int64 ``(G, N)`` and ``sq_dist`` ``(G, N)`` (float32 or float64).
    """
    if x.dim() == 2:
        idx, dist = nearest_code(x[None], codes[None], chunk_elements, distances)
        return idx[0], None if dist is None else dist[0]
    work = torch.float64 if codes.dtype == torch.float64 else torch.float32
    if x.dtype != work or codes.dtype != work:
        x, codes = x.to(work), codes.to(work)
    groups, n, d = x.shape
    k = codes.shape[1]
    codes_t = codes.transpose(1, 2)
    # tiles of rows x codes; no temporary (distances, squares) exceeds chunk_elements
    code_chunk = max(1, min(k, chunk_elements // (groups * max(1, min(n, MIN_TILE_ROWS), d))))
    row_chunk = max(1, chunk_elements // (groups * max(code_chunk, d)))
    if code_chunk >= k and row_chunk >= n:  # one tile: the loops below, without copies
        dist = torch.baddbmm((codes * codes).sum(-1)[:, None], x, codes_t, alpha=-2)
        vals, idxs = dist.min(dim=-1)
        return idxs, (vals + (x * x).sum(-1)).clamp_min_(0) if distances else None
    code_sq = torch.empty(groups, k, dtype=work, device=x.device)
    for k0 in range(0, k, code_chunk):  # by chunks: no (G, K, d) temporary
        part = codes[:, k0 : k0 + code_chunk]
        code_sq[:, k0 : k0 + code_chunk] = (part * part).sum(-1)
    best = torch.empty(groups, n, dtype=work, device=x.device)
    best_idx = torch.empty(groups, n, dtype=torch.long, device=x.device)
    for r0 in range(0, n, row_chunk):
        xr = x[:, r0 : r0 + row_chunk]
        x_sq = (xr * xr).sum(-1)
        vals = idxs = None
        for k0 in range(0, k, code_chunk):
            k1 = min(k, k0 + code_chunk)
            dist = torch.baddbmm(code_sq[:, None, k0:k1], xr, codes_t[:, :, k0:k1], alpha=-2)
            v, i = dist.min(dim=-1)
            if vals is None:
                vals, idxs = v, i
            else:
                better = v < vals  # strict: an earlier chunk wins ties
                vals = torch.where(better, v, vals)
                idxs = torch.where(better, i + k0, idxs)
        best[:, r0 : r0 + row_chunk] = vals + x_sq
        best_idx[:, r0 : r0 + row_chunk] = idxs
    return best_idx, best.clamp_min_(0) if distances else None


def gather_codes(codes: Tensor, indices: Tensor) -> Tensor:
    """``codes[g, indices[g, n]]``: ``(G, K, d)``, ``(G, N)`` -> ``(G, N, d)``, differentiable."""
    if codes.requires_grad and torch.is_grad_enabled():  # its gradient as indexing sums it
        group = torch.arange(codes.shape[0], device=codes.device)[:, None]
        return codes[group, indices]
    groups, k, d = codes.shape  # the same rows, in one call
    flat = indices
    if groups > 1:
        flat = indices + torch.arange(groups, device=codes.device)[:, None] * k
    return codes.reshape(groups * k, d).index_select(0, flat.reshape(-1)).view(*indices.shape, d)


@torch.no_grad()
def assignment_statistics(x: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Counts ``n`` ``(G, K)`` and sums ``s`` ``(G, K, d)`` of the inputs assigned to each code."""
    groups, _, d = x.shape
    if groups > 1:
        indices = indices + torch.arange(groups, device=x.device)[:, None] * k
    flat = indices.reshape(-1)
    counts = torch.bincount(flat, minlength=groups * k).to(x.dtype)
    # index_add_ (torch 2.13, 2 CPU cores): 0.5 ms at 16,384 x 1,024 x 128 against 6 ms for
    # index_put_(accumulate=True) and 15 ms for a one-hot matrix product; deterministic on CPU.
    sums = torch.zeros(groups * k, d, dtype=x.dtype, device=x.device)
    sums.index_add_(0, flat, x.reshape(-1, d))
    return counts.view(groups, k), sums.view(groups, k, d)


def laplace_smooth(cluster_size: Tensor, eps: float) -> Tensor:
    """``(N_k + eps) / (sum N + K eps) * sum N`` per group: no code divides by zero."""
    total = cluster_size.sum(-1, keepdim=True)
    return (cluster_size + eps) / (total + cluster_size.shape[-1] * eps) * total


def _sample_rows(x: Tensor, count: int) -> Tensor:
    """``count`` distinct rows per group (with repeats only when ``N < count``): ``(G, count)``."""
    groups, n, _ = x.shape
    if n >= count:
        return torch.rand(groups, n, device=x.device).argsort(dim=1)[:, :count]
    return torch.randint(n, (groups, count), device=x.device)


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 10, cosine: bool = False) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means per group, seeded with ``k`` random inputs.

    ``x``: ``(G, N, d)``. Returns centroids ``(G, k, d)`` and their final counts
    ``(G, k)``; a centroid that loses all its points keeps its place.
    """
    x = x.float() if x.dtype != torch.float64 else x
    centroids = gather_codes(x, _sample_rows(x, k))
    counts = torch.zeros(x.shape[0], k, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        indices, _ = nearest_code(x, centroids, distances=False)
        counts, sums = assignment_statistics(x, indices, k)
        means = sums / counts.clamp_min(1)[..., None]
        if cosine:
            means = l2norm(means)
        centroids = torch.where(counts[..., None] > 0, means, centroids)
    return centroids, counts


class Codebook(nn.Module):
    """``G`` codebooks of ``K`` codes of size ``d``: search, EMA, k-means init, dead codes.

    ``forward(x)`` with ``x`` ``(G, N, d)`` returns ``(codes, indices)``, codes
    ``(G, N, d)`` as they stood before this batch's update (differentiable
    with respect to the codebook when ``decay=None``), indices ``(G, N)``.
    In training mode it also initialises by k-means on the first batch,
    applies the EMA update and replaces dead codes. A learned codebook (``decay=None``)
    still counts its codes' use, with ``usage_decay``, for dead-code replacement.

    ``cluster_size_init``: ``"ones"`` starts every ``N_k`` at 1 with ``S_k = e_k``,
    consistent with the codes. ``"zeros"`` (reproduces the failure; never use) starts
    ``N_k = 0`` with ``S_k = e_k``, as Sonnet's VectorQuantizerEMA and tutorials do:
    after the first update a never-used code is ``decay * e_k / smoothed N_k`` with
    the smoothed ``N_k = eps * sum N / (sum N + K eps)``, about ``decay / eps``
    (~1e5) times its initial size (Sonnet #272).
    """

    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS  # tile bound of the nearest-code search

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        num_groups: int = 1,
        decay: float | None = 0.99,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        cosine: bool = False,
        eps: float = 1e-5,
        usage_decay: float = 0.99,
        owner: str = "Codebook",
        cluster_size_init: str = "ones",
    ) -> None:
        super().__init__()
        check(
            is_int(codebook_size) and codebook_size >= 1,
            f"{owner}: codebook_size={codebook_size!r}, allowed is an integer >= 1",
        )
        check(is_int(dim) and dim >= 1, f"{owner}: dim={dim!r}, allowed is an integer >= 1")
        check(
            decay is None or (isinstance(decay, float | int) and 0.0 <= decay < 1.0),
            f"{owner}: decay={decay!r}, allowed is a number in [0, 1) or None (learned codebook)",
        )
        check(
            isinstance(usage_decay, float | int) and 0.0 <= usage_decay < 1.0,
            f"{owner}: decay={usage_decay!r}, allowed is a number in [0, 1) or None",
        )
        check(
            is_int(kmeans_iters) and kmeans_iters >= 1,
            f"{owner}: kmeans_iters={kmeans_iters!r}, allowed is an integer >= 1",
        )
        check(
            isinstance(dead_code_threshold, float | int) and dead_code_threshold >= 0,
            f"{owner}: dead_code_threshold={dead_code_threshold!r}, allowed is a number >= 0",
        )
        check(
            cluster_size_init in CLUSTER_SIZE_INITS,
            f"{owner}: cluster_size_init={cluster_size_init!r}, allowed: "
            f"{', '.join(CLUSTER_SIZE_INITS)}",
        )
        self.codebook_size, self.dim, self.num_groups = codebook_size, dim, num_groups
        self.decay = None if decay is None else float(decay)
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold = float(dead_code_threshold)
        self.cosine, self.eps = cosine, eps
        self.usage_decay = usage_decay if decay is None else float(decay)
        embed = torch.randn(num_groups, codebook_size, dim)
        if cosine:
            embed = l2norm(embed)
        if self.decay is None:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_sum", embed.clone())
        start = torch.ones if cluster_size_init == "ones" else torch.zeros
        self.register_buffer("cluster_size", start(num_groups, codebook_size))
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    @property
    def horizon(self) -> float:
        """Batches the usage EMA spans, ``1 / (1 - decay)``: dead codes are counted over it."""
        return 1.0 / (1.0 - self.usage_decay) if self.usage_decay < 1.0 else 1.0

    @property
    def learned(self) -> bool:
        """True when the codebook is trained by gradient (``decay=None``), not by EMA."""
        return self.decay is None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initted):
            self.init_from(x)
        indices, _ = nearest_code(x, self.embed, self.chunk_elements, distances=False)
        codes = gather_codes(self.embed, indices)
        if self.training and (x.shape[1] > 0 or distributed.is_distributed()):
            self.update(x.detach(), indices)
            if self.dead_code_threshold > 0:
                self.replace_dead_codes(x.detach())
        return codes, indices

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """Set the codes to k-means centroids of ``x`` ``(G, N, d)``; statistics to match.

        Distributed: on the union of all ranks' ``x``, rank 0's result broadcast.
        An empty ``x`` (on every rank) leaves the codebook uninitialised.
        """
        x = distributed.gather_rows(x)
        if x.shape[1] == 0:
            return
        centroids, counts = kmeans(x, self.codebook_size, self.kmeans_iters, self.cosine)
        distributed.broadcast_(centroids, counts)
        self._set_codes(torch.ones_like(counts, dtype=torch.bool), centroids, counts.clamp_min(1))
        self.initted.fill_(True)

    @torch.no_grad()
    def update(self, x: Tensor, indices: Tensor) -> None:
        """Fold a batch's assignments into the EMA statistics (and the codes, in EMA mode)."""
        counts, sums = assignment_statistics(
            x.to(self.cluster_size.dtype), indices, self.codebook_size
        )
        if not distributed.sum_statistics_(counts, sums):  # summed over ranks
            return
        if self.learned:
            self.cluster_size.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
            return
        # both EMAs in two calls (the same decay: the same mul_ and add_ on each)
        averages = [self.cluster_size, self.embed_sum]
        torch._foreach_mul_(averages, self.decay)
        torch._foreach_add_(averages, [counts, sums], alpha=1 - self.decay)
        # written in place: l2norm's values (x / max(|x|, 1e-12)) in two operations fewer
        smooth = laplace_smooth(self.cluster_size, self.eps).unsqueeze_(-1)
        embed = torch.div(self.embed_sum, smooth, out=self.embed)
        if self.cosine:
            embed.div_(torch.linalg.vector_norm(embed, dim=-1, keepdim=True).clamp_min_(1e-12))

    @torch.no_grad()
    def replace_dead_codes(self, x: Tensor) -> int:
        """Move codes with ``cluster_size * horizon < dead_code_threshold`` onto rows of ``x``.

        Their statistics restart at ``cluster_size = threshold / horizon`` and
        ``embed_sum = cluster_size * code``. Returns the number of codes replaced.
        """
        dead = self.cluster_size * self.horizon < self.dead_code_threshold
        distributed.broadcast_(dead)  # decided once, on rank 0
        replaced = int(dead.sum())
        if replaced == 0:
            return 0
        x = distributed.gather_rows(x)
        if x.shape[1] == 0:
            return 0
        samples = gather_codes(x.to(self.embed.dtype), _sample_rows(x, self.codebook_size))
        distributed.broadcast_(samples)
        if self.cosine:
            samples = l2norm(samples)
        size = torch.full_like(self.cluster_size, self.dead_code_threshold / self.horizon)
        self._set_codes(dead, samples, size)
        return replaced

    def _set_codes(self, mask: Tensor, codes: Tensor, cluster_size: Tensor) -> None:
        """Where ``mask`` ``(G, K)``: codes, cluster sizes and EMA sums set consistently."""
        m = mask[..., None]  # each written in place (out=), no copy
        torch.where(m, codes.to(self.embed.dtype), self.embed.data, out=self.embed.data)
        torch.where(mask, cluster_size, self.cluster_size, out=self.cluster_size)
        if not self.learned:
            sums = codes * cluster_size[..., None]
            torch.where(m, sums.to(self.embed_sum.dtype), self.embed_sum, out=self.embed_sum)

    def extra_repr(self) -> str:
        return (
            f"groups={self.num_groups}, codebook_size={self.codebook_size}, dim={self.dim}, "
            f"decay={self.decay}, kmeans_init={self.kmeans_init}, "
            f"dead_code_threshold={self.dead_code_threshold}, cosine={self.cosine}"
        )


def batch_norm(owner: str, pre_norm: object, dim: int) -> nn.BatchNorm1d | None:
    """The ``pre_norm`` option's BatchNorm without affine over ``dim``, or None when off."""
    check(
        isinstance(pre_norm, bool),
        f"{owner}: pre_norm={pre_norm!r}, allowed is True or False",
    )
    return nn.BatchNorm1d(dim, affine=False) if pre_norm else None


def projections(dim: int, codebook_dim: int | None, owner: str) -> tuple[nn.Module, nn.Module]:
    """Linear ``dim -> codebook_dim`` and back, or identities when the sizes agree."""
    check(
        codebook_dim is None or (is_int(codebook_dim) and codebook_dim >= 1),
        f"{owner}: codebook_dim={codebook_dim!r}, allowed is an integer >= 1 or None (= dim)",
    )
    if codebook_dim is None or codebook_dim == dim:
        return nn.Identity(), nn.Identity()
    return nn.Linear(dim, codebook_dim), nn.Linear(codebook_dim, dim)
