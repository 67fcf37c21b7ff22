"""Residual vector quantization (Zeghidour et al. 2021, SoundStream).

Each of ``Q`` codebooks quantizes what the previous ones left over::

    r_1 = z,   c_i = nearest code of r_i in codebook i,   r_{i+1} = r_i - c_i
    q   = c_1 + ... + c_Q

The sum passes gradients to ``z`` once (straight through, or by the rotation
trick); each layer adds its commitment loss ``beta |r_i - sg(c_i)|^2``. With
k-means initialisation each layer is seeded on the residuals it actually sees.
``pre_norm`` standardises ``z`` per dimension first (BatchNorm without affine).
With ``directional_reparam`` (DiVeQ) the sum passes through DiVeQ once, in
training ``z + sg(unit(q - z + sqrt(var) n)) |q - z|``, which trains every layer's
codebook by gradient, with no loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stabq.errors import check, check_int, check_number
from stabq.quantizers.base import Quantizer
from stabq.quantizers.codebook import (
    Codebook,
    batch_norm,
    commitment_loss,
    estimate,
    projections,
    residual_commitment_loss,
)
from stabq.quantizers.fsq import pre_normalise
from stabq.quantizers.gradients import directional_decays, straight_through, straight_through_loss
from stabq.quantizers.gradients import directional_reparam as diveq


class ResidualVQ(Quantizer):
    """Residual VQ (Zeghidour et al. 2021): `num_quantizers` codebooks on successive residuals.

    Each codebook quantizes what the ones before it left over; the output is the sum of
    the chosen codes, with the gradient passed to the input once (straight through, or
    by the rotation trick). Each layer adds its commitment loss; with k-means init each
    layer is seeded on the residuals it sees.

    Args:
        dim: input size, an integer >= 1.
        num_quantizers: layers `Q`, an integer >= 1; indices are `(..., Q)`.
        codebook_size: codes per layer, an integer >= 1.
        codebook_dim: code size (default None: `dim`); Linear projections in and out
            when it differs from `dim`.
        decay: EMA decay of the codebooks, in [0, 1); None trains them by gradient.
        commitment_weight: `beta` of each layer's commitment loss, a number >= 0.
        kmeans_init: initialise each layer by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation, an integer >= 1.
        dead_code_threshold: replace codes that fewer inputs than this reached over the
            EMA horizon (as `VectorQuantizer`; 0: never).
        cosine: must stay False: residuals of unit vectors are not unit vectors, so
            cosine distance has no meaning past the first layer.
        rotation_trick: pass gradients by the rotation trick rather than straight through.
        directional_reparam: DiVeQ on the sum of the codes, `q` (as `VectorQuantizer`):
            in training the output is `z + sg(unit(q - z + sqrt(var) n)) |q - z|`; every
            layer's codebook is learned by its gradient whatever `decay` says (`decay`
            then sets only the dead-code horizon; None: 0.99); no loss. Needs
            `dead_code_threshold` > 0; not with `rotation_trick`. In evaluation: `q`.
        directional_reparam_variance: `var`, the variance of the noise, a number >= 0.
        pre_norm: standardise each code dimension over the batch before the first
            layer (as `VectorQuantizer`): the codebooks need not follow the encoder's
            scale; the output is in that standardised scale. True or False.

    Raises:
        ConfigError: an option outside the range given above, `cosine=True`, `pre_norm`
            not a bool, or `directional_reparam` with `rotation_trick` or no dead-code
            replacement.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.ResidualVQ(16, num_quantizers=3, codebook_size=32)
        >>> out = q(torch.randn(64, 16))
        >>> out.indices.shape, q.indices_to_codes(out.indices).shape
        (torch.Size([64, 3]), torch.Size([64, 16]))
    """

    multi_codebook = True

    def __init__(
        self,
        dim: int,
        num_quantizers: int = 4,
        codebook_size: int = 256,
        codebook_dim: int | None = None,
        decay: float | None = 0.99,
        commitment_weight: float = 0.25,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        cosine: bool = False,
        rotation_trick: bool = False,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_int(name, "dim", dim, 1)
        check_int(name, "num_quantizers", num_quantizers, 1)
        check(
            not cosine,
            f"{name}: cosine={cosine!r}, allowed is False (residuals are not unit vectors)",
        )
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_quantizers
        self.commitment_weight = check_number(name, "commitment_weight", commitment_weight, 0)
        self.rotation_trick = rotation_trick
        self.directional_reparam = directional_reparam
        # with DiVeQ the codebooks learn by its gradient; decay then sets the usage horizon only
        self.directional_reparam_variance, decay, usage_decay = directional_decays(
            name, directional_reparam, directional_reparam_variance, rotation_trick, False,
            dead_code_threshold, decay,
        )  # fmt: skip
        self.project_in, self.project_out = projections(dim, codebook_dim, name)
        self.pre_norm = batch_norm(name, pre_norm, codebook_dim or dim)
        self.layers = nn.ModuleList(
            Codebook(
                codebook_size,
                codebook_dim or dim,
                decay=decay,
                kmeans_init=kmeans_init,
                kmeans_iters=kmeans_iters,
                dead_code_threshold=dead_code_threshold,
                usage_decay=usage_decay,
                owner=name,
            )
            for _ in range(num_quantizers)
        )

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = pre_normalise(self.pre_norm, self.project_in(x))
        if self.directional_reparam:
            return self._quantize_diveq(z)
        if self.layers[0].learned:
            total, indices, loss = self._descend_learned(z)
        else:
            total, indices, residual = self._descend_ema(z)
            if not self.rotation_trick:  # the output and the loss in one autograd node
                weight = self.commitment_weight
                out, loss = straight_through_loss(z, total, weight, "mean", residual)
                return self.project_out(out), torch.stack(indices, dim=-1), loss
            loss = residual_commitment_loss(z, *residual, self.commitment_weight)
        quantized = self.project_out(estimate(z, total, self.rotation_trick))
        return quantized, torch.stack(indices, dim=-1), loss

    def _quantize_diveq(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """DiVeQ on the sum of the codes, which keeps its gradient to every codebook."""
        total = torch.zeros_like(z)
        indices = []
        for layer in self.layers:
            codes, idx = layer((z - total).detach()[None])
            total = total + codes[0].to(z.dtype)
            indices.append(idx[0])
        if self.training:
            out = diveq(z, total, self.directional_reparam_variance)
        else:
            out = straight_through(z, total)
        loss = z.new_zeros((), dtype=torch.float32)
        return self.project_out(out), torch.stack(indices, dim=-1), loss

    def _descend_ema(self, z: Tensor) -> tuple[Tensor, list[Tensor], tuple[Tensor, Tensor]]:
        """EMA codebooks: the descent runs without autograd; returns the sum of the codes,
        the indices and the loss's terms ``(sum_i r_{i+1}, sum_i |r_{i+1}|^2)``.

        Since ``r_i - sg(c_i) = r_{i+1}``, the loss is ``beta sum_i mean(r_{i+1}^2)``
        with gradient ``2 beta / numel * sum_i r_{i+1}`` to ``z``: one pass
        backward rather than one ``mse_loss`` per layer. Each layer's input is
        ``z - (c_1 + ... + c_{i-1})``, not ``r_{i-1} - c_{i-1}``: the same value,
        but the latter is exactly zero for an input that was a code of the layer
        before (a k-means seed of a singleton cluster), and many exactly equal
        rows seed k-means with duplicate centroids (measured on ``stabq.demo``'s
        mixture: usage 0.83 instead of 0.98).
        """
        indices = []
        with torch.no_grad():
            target = z.detach()
            total = torch.zeros_like(target)
            residual_sum = torch.zeros_like(target, dtype=torch.float32)
            squared = target.new_zeros((), dtype=torch.float32)
            for layer in self.layers:
                residual = target - total
                codes, idx = layer(residual[None])
                codes = codes[0].to(target.dtype)
                total.add_(codes)
                left = residual.sub_(codes).reshape(-1)  # r_{i+1}, for the loss
                residual_sum.add_(left.view_as(residual_sum))
                squared += left.dot(left).float()
                indices.append(idx[0])
        return total, indices, (residual_sum, squared)

    def _descend_learned(self, z: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Learned codebooks: each layer's codebook loss needs autograd through its codes."""
        total = torch.zeros_like(z)
        loss = z.new_zeros((), dtype=torch.float32)
        indices = []
        for layer in self.layers:
            residual = z - total
            codes, idx = layer(residual.detach()[None])
            codes = codes[0].to(z.dtype)
            loss = loss + commitment_loss(residual, codes, self.commitment_weight, learned=True)
            total = total + codes.detach()
            indices.append(idx[0])
        return total, indices, loss

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(..., num_quantizers)`` to ``(..., dim)``: summed codes, projected out."""
        flat = self._check_indices(indices).to(self.layers[0].embed.device)
        total = sum(layer.embed[0][flat[:, i]] for i, layer in enumerate(self.layers))
        return self.project_out(total).reshape(*indices.shape[:-1], self.dim)


__all__ = ["ResidualVQ"]
