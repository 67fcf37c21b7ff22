"""SimVQ: a frozen codebook basis times one learned linear layer (Zhu et al. 2024,
"Addressing representation collapse in vector quantized models with one linear layer").

    C = B W^T             B (K, dim) frozen basis, W (dim, dim) learned: the codebook
    k = argmin_k |z - C_k|^2,   q = C_k
    out  = z + sg(q - z)  (straight through; or the rotation trick)
    loss = |sg(z) - q|^2 + beta |z - sg(q)|^2         (means, beta = commitment_weight)

The codebook loss reaches every code through ``W``, not only the selected
ones: a code that no input picks still moves with the codes that are picked,
so none is left behind where no input lands (what kills codes in plain VQ).
The basis is random (``N(0, 1/dim)``, as in the paper and vector-quantize-pytorch)
or, with ``init="kmeans"``, the k-means centroids of the first training batch
with ``W`` reset to the identity, so that training starts from ``C = centroids``.
The k-means runs on the union of all ranks' batches, rank 0's result broadcast
(as :class:`~stabq.quantizers.codebook.Codebook` does); ``W`` is a parameter, so
DistributedDataParallel keeps it equal on every rank.

``pre_norm=True`` standardises ``z`` per dimension over the batch first (as FSQ's
``pre_norm``), and ``identity_transform=True`` starts ``W`` at the identity: with
``nn.Linear``'s random start ``W`` is nearly singular, and the codebook starts close
to a subspace of lower dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stabq import distributed
from stabq.errors import check, check_int, check_number
from stabq.quantizers.base import Quantizer
from stabq.quantizers.codebook import commitment_loss, estimate, kmeans, nearest_code
from stabq.quantizers.fsq import pre_normalise

INITS = ("random", "kmeans")


class SimVQ(Quantizer):
    """SimVQ (Zhu et al. 2024): codes `C = B W^T`, a frozen basis `B` times a learned `W`.

    The codebook loss reaches every code through `W`, not only the chosen ones, so a
    code no input picks still moves with those that are picked: none is left behind.
    The loss is `mean |sg(z) - q|^2 + commitment_weight * mean |z - sg(q)|^2`.

    Args:
        dim: input and code size, an integer >= 1.
        codebook_size: number of codes `K`, an integer >= 1.
        commitment_weight: `beta`, the weight of `|z - sg(q)|^2` (the codebook term
            `|sg(z) - q|^2` has weight 1, as in the paper), a number >= 0.
        init: `"random"` (a Gaussian basis, `N(0, 1/dim)`) or `"kmeans"` (the basis is
            the k-means centroids of the first training batch, `W = I`).
        kmeans_iters: Lloyd iterations of that initialisation, an integer >= 1.
        rotation_trick: pass gradients to `z` by the rotation trick rather than straight
            through.
        pre_norm: standardise each input dimension over the batch first (BatchNorm
            without affine parameters; running statistics at eval), so that the
            encoder's scale cannot run away from the codes.
        identity_transform: start `W` at the identity, so that the codebook starts as
            the basis itself; otherwise `W` starts as `nn.Linear`'s default, a random
            matrix whose smallest singular value is near 0 (the codebook starts close
            to a lower-dimensional subspace). `init="kmeans"` sets `W = I` anyway.

    Raises:
        ConfigError: an option outside the range given above.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.SimVQ(16, codebook_size=128)
        >>> out = q(torch.randn(32, 16))
        >>> out.indices.shape, q.codebook.shape
        (torch.Size([32]), torch.Size([128, 16]))
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 1024,
        commitment_weight: float = 0.25,
        init: str = "random",
        kmeans_iters: int = 10,
        rotation_trick: bool = False,
        pre_norm: bool = False,
        identity_transform: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.dim = check_int(name, "dim", dim, 1)
        self.codebook_size = check_int(name, "codebook_size", codebook_size, 1)
        self.commitment_weight = check_number(name, "commitment_weight", commitment_weight, 0)
        check(init in INITS, f"{name}: init={init!r}, allowed is one of {', '.join(INITS)}")
        self.init = init
        self.kmeans_iters = check_int(name, "kmeans_iters", kmeans_iters, 1)
        self.rotation_trick = rotation_trick
        self.register_buffer("basis", torch.randn(codebook_size, dim) * dim**-0.5)
        self.transform = nn.Linear(dim, dim, bias=False)
        if identity_transform:
            with torch.no_grad():
                self.transform.weight.copy_(torch.eye(dim))
        self.pre_norm = nn.BatchNorm1d(dim, affine=False) if pre_norm else None
        self.register_buffer("initted", torch.tensor(init != "kmeans"))

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook ``B W^T`` ``(codebook_size, dim)``, differentiable in ``W``."""
        return self.transform(self.basis)

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = pre_normalise(self.pre_norm, x)
        if self.training and not bool(self.initted):
            self.init_basis(x)
        codebook = self.codebook
        indices, _ = nearest_code(x, codebook.detach(), distances=False)
        codes = codebook[indices]
        loss = commitment_loss(x, codes, self.commitment_weight, learned=True)
        return estimate(x, codes, self.rotation_trick), indices, loss

    @torch.no_grad()
    def init_basis(self, x: Tensor) -> None:
        """Basis = k-means centroids of ``x`` ``(n, dim)`` (all ranks' rows), ``W = I``.

        An empty ``x`` on every rank leaves the quantizer uninitialised.
        """
        rows = distributed.gather_rows(x.detach()[None])
        if rows.shape[1] == 0:
            return
        centroids, counts = kmeans(rows, self.codebook_size, self.kmeans_iters)
        distributed.broadcast_(centroids, counts)
        self.basis.copy_(centroids[0])
        self.transform.weight.copy_(torch.eye(self.dim))
        self.initted.fill_(True)

    @torch.no_grad()
    def init_from_features(self, x: Tensor) -> None:
        """Re-initialise by k-means on features ``x`` ``(..., dim)`` (two-stage training);
        with ``pre_norm``, standardised by their own statistics, as a training batch is."""
        rows = x.reshape(-1, self.dim).to(self.basis.dtype)
        if self.pre_norm is not None and rows.shape[0] > 1:
            rows = F.batch_norm(rows, None, None, training=True, eps=self.pre_norm.eps)
        self.init_basis(rows)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(...,)`` to codes ``(..., dim)`` of the implicit codebook."""
        flat = self._check_indices(indices).to(self.basis.device)
        return self.codebook[flat].reshape(*indices.shape, self.dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, init={self.init!r}, "
            f"rotation_trick={self.rotation_trick}, pre_norm={self.pre_norm is not None}"
        )


__all__ = ["SimVQ"]
