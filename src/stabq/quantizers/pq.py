"""Product quantization (Jégou et al. 2011), trained in the network, readable by Faiss.

``x`` ``(n, dim)`` is cut into ``M = num_subspaces`` slices of ``dim / M``
values; slice ``m`` is quantized by its own codebook of ``2^bits`` codes::

    x = [x_1 | ... | x_M],   k_m = argmin_k |x_m - C_m[k]|^2,   q = [C_1[k_1] | ... | C_M[k_M]]

Indices are ``(..., M)``. The centroid layout ``(M, 2^bits, dim / M)`` is
Faiss's, so :meth:`ProductQuantizer.to_faiss` and
:meth:`ProductQuantizer.from_faiss` move trained codebooks across, and the
indices equal ``faiss.ProductQuantizer.compute_codes`` (unpacked) for the
same centroids.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from stabq.errors import check, check_int, check_number, is_int
from stabq.quantizers.base import Quantizer
from stabq.quantizers.codebook import Codebook, commitment_loss, estimate
from stabq.quantizers.gradients import straight_through_loss


class ProductQuantizer(Quantizer):
    """Product quantization (Jégou et al. 2011): `num_subspaces` slices, each its own codebook.

    `x (n, dim)` is cut into `M = num_subspaces` slices of `dim / M` values; slice `m`
    is quantized by its own codebook of `2**bits` codes, in Euclidean distance. The
    centroids' layout `(M, 2**bits, dim / M)` is Faiss's: `to_faiss` and `from_faiss`
    move trained codebooks across, and the indices equal
    `faiss.ProductQuantizer.compute_codes` (unpacked) for the same centroids.

    Args:
        dim: input size, an integer >= 1 that `num_subspaces` divides.
        num_subspaces: `M`, an integer >= 1; indices are `(..., M)`.
        bits: bits per subspace code, 1 to 16: `2**bits` codes a codebook.
        decay: EMA decay of the codebooks, in [0, 1); None trains them by gradient.
        commitment_weight: `beta` of the commitment loss, a number >= 0.
        kmeans_init: initialise each codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation, an integer >= 1.
        dead_code_threshold: replace codes that fewer inputs than this reached over the
            EMA horizon (as `VectorQuantizer`; 0: never).
        rotation_trick: pass gradients by the rotation trick rather than straight through.

    Raises:
        ConfigError: an option outside the range given above.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.ProductQuantizer(32, num_subspaces=4, bits=6)
        >>> out = q(torch.randn(100, 32))
        >>> out.indices.shape, q.centroids.shape
        (torch.Size([100, 4]), torch.Size([4, 64, 8]))
    """

    multi_codebook = True

    def __init__(
        self,
        dim: int,
        num_subspaces: int = 8,
        bits: int = 8,
        decay: float | None = 0.99,
        commitment_weight: float = 0.25,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        rotation_trick: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_int(name, "dim", dim, 1)
        check(
            is_int(num_subspaces) and num_subspaces >= 1 and dim % num_subspaces == 0,
            f"{name}: num_subspaces={num_subspaces!r} with dim={dim}, "
            f"allowed is an integer >= 1 that divides dim",
        )
        check(
            is_int(bits) and 1 <= bits <= 16,
            f"{name}: bits={bits!r}, allowed is an integer from 1 to 16",
        )
        self.dim = dim
        self.bits = bits
        self.codebook_size = 2**bits
        self.num_codebooks = num_subspaces
        self.commitment_weight = check_number(name, "commitment_weight", commitment_weight, 0)
        self.rotation_trick = rotation_trick
        self.codebook = Codebook(
            2**bits,
            dim // num_subspaces,
            num_groups=num_subspaces,
            decay=decay,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            dead_code_threshold=dead_code_threshold,
            owner=name,
        )

    def _split(self, x: Tensor) -> Tensor:
        """``(n, dim)`` -> ``(M, n, dim / M)``."""
        return x.reshape(x.shape[0], self.num_codebooks, self.codebook.dim).transpose(0, 1)

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        codes, indices = self.codebook(self._split(x))
        codes = codes.transpose(0, 1).reshape(x.shape).to(x.dtype)
        if not (self.codebook.learned or self.rotation_trick):  # one autograd node for both
            out, loss = straight_through_loss(x, codes, self.commitment_weight)
            return out, indices.T, loss
        loss = commitment_loss(x, codes, self.commitment_weight, self.codebook.learned)
        return estimate(x, codes, self.rotation_trick), indices.T, loss

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(..., M)`` to ``(..., dim)``: the subspace codes side by side."""
        flat = self._check_indices(indices).to(self.codebook.embed.device)
        subspace = torch.arange(self.num_codebooks, device=flat.device)
        codes = self.codebook.embed[subspace, flat]  # (n, M, dim / M)
        return codes.reshape(*indices.shape[:-1], self.dim)

    @property
    def centroids(self) -> Tensor:
        """Codebooks ``(M, 2**bits, dim / M)``, detached (Faiss's layout)."""
        return self.codebook.embed.detach()

    def to_faiss(self):  # -> faiss.ProductQuantizer
        """A trained `faiss.ProductQuantizer` holding these centroids (float32)."""
        import faiss

        pq = faiss.ProductQuantizer(self.dim, self.num_codebooks, self.bits)
        flat = self.centroids.float().cpu().numpy().reshape(-1)
        faiss.copy_array_to_vector(np.ascontiguousarray(flat), pq.centroids)
        return pq

    @classmethod
    def from_faiss(cls, pq, **codebook_options) -> ProductQuantizer:
        """Build a ProductQuantizer from a trained `faiss.ProductQuantizer`.

        The codes count as initialised, so no k-means runs on them again.

        Args:
            pq (faiss.ProductQuantizer): a trained quantizer; its `d`, `M` and `nbits`
                give `dim`, `num_subspaces` and `bits`.
            **codebook_options (Any): further options of the constructor (`decay`,
                `dead_code_threshold`, ...).

        Raises:
            ConfigError: the faiss quantizer holds no trained centroids.
        """
        import faiss

        model = cls(int(pq.d), int(pq.M), int(pq.nbits), **codebook_options)
        centroids = faiss.vector_to_array(pq.centroids)
        expected = model.codebook.embed.numel()
        check(
            centroids.size == expected,
            f"ProductQuantizer.from_faiss: the faiss quantizer holds {centroids.size} centroid "
            f"values, expected {expected} (is it trained?)",
        )
        codes = torch.from_numpy(centroids.astype(np.float32)).view_as(model.codebook.embed)
        cb = model.codebook
        cb._set_codes(torch.ones_like(cb.cluster_size, dtype=torch.bool), codes, cb.cluster_size)
        cb.initted.fill_(True)
        return model


__all__ = ["ProductQuantizer"]
