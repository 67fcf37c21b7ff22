"""Vector quantization: nearest code of one codebook (van den Oord et al. 2017).

    z = W_in x            (optional low-dim codebook, ``codebook_dim``)
    z = BN(z)             (``pre_norm``: standardised per dimension, no affine)
    z = z / |z|           (``cosine``: codes and inputs on the unit sphere)
    k = argmin_k |z - e_k|^2,   q = e_k
    out = W_out q         with the gradient of q passed to z straight through
                          (or by the rotation trick)
    loss = beta |z - sg(q)|^2  (+ |sg(z) - q|^2 for a learned codebook), mean over elements

or, with ``directional_reparam`` (DiVeQ, Vali et al. 2025), in training
``out = W_out (z + sg(unit(q - z + sqrt(var) n)) |q - z|)``, n ~ N(0, I), a
codebook learned by that gradient alone and no loss.

The defaults are vanilla VQ-EMA: the baseline that collapses under a
classifier's cross-entropy. The repairs (k-means init, dead-code replacement,
a 32-dim cosine codebook) are options; the preset ``vq`` turns them on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stabq.errors import check, check_int, check_number
from stabq.quantizers.base import Quantizer
from stabq.quantizers.codebook import (
    REDUCTIONS,
    Codebook,
    batch_norm,
    commitment_loss,
    estimate,
    projections,
)
from stabq.quantizers.fsq import pre_normalise
from stabq.quantizers.gradients import (
    directional_decays,
    straight_through,
    straight_through_loss,
    unit_rows,
)
from stabq.quantizers.gradients import directional_reparam as diveq


class VectorQuantizer(Quantizer):
    """Vector quantization (van den Oord et al. 2017): the nearest of `codebook_size` codes.

    The defaults are vanilla VQ-EMA (preset `vq-ema`), the baseline that collapses under
    a classifier's cross-entropy; the repairs (k-means init, dead-code replacement, a
    32-dim cosine codebook, decay 0.95) are options, which the preset `vq` turns on. The
    loss is `commitment_weight * mean |z - sg(q)|^2`, plus `mean |sg(z) - q|^2` for a
    codebook trained by gradient (`decay=None`).

    Args:
        dim: input size, an integer >= 1.
        codebook_size: number of codes `K`, an integer >= 1.
        codebook_dim: code size (default None: `dim`); Linear projections in and out
            when it differs from `dim`.
        decay: EMA decay of the codebook, in [0, 1); None trains it by gradient instead.
        commitment_weight: `beta` of the commitment loss, a number >= 0.
        kmeans_init: initialise the codes by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation, an integer >= 1.
        dead_code_threshold: move a code that fewer inputs than this reached over the
            EMA horizon of `1 / (1 - decay)` batches onto an input of the current batch
            (a number >= 0; 0: never).
        cosine: cosine distance (unit-norm inputs and codes).
        rotation_trick: pass gradients by the rotation trick rather than straight through.
        commitment_reduction: `"mean"` over every element, or `"sum"` over the whole
            batch as tutorials write `beta * ((z - sg(q))**2).sum()`: it reproduces a
            failure (the loss scales with batch x dim); never use it otherwise.
        cluster_size_init: `"ones"`, or `"zeros"` with Laplace smoothing, which makes
            never-used codes about 1e5 times too large: it reproduces a failure; never
            use it otherwise.
        directional_reparam: DiVeQ (Vali et al. 2025): in training the output is
            `z + sg(unit(q - z + sqrt(var) n)) |q - z|` with `n ~ N(0, I)`, at distance
            `|q - z|` from `z` and about `q`; its gradient trains the codebook, so the
            codebook is learned by gradient whatever `decay` says (`decay` then sets
            only the horizon over which dead codes are counted; None: 0.99), and there
            is no loss. Needs `dead_code_threshold` > 0; not with `rotation_trick` or
            `cosine`. In evaluation the output is `q`.
        directional_reparam_variance: `var`, the variance of that noise, a number >= 0.
        pre_norm: standardise each code dimension over the batch before the search
            (BatchNorm without affine, after the input projection; running statistics
            at eval or for a single row, every rank's rows in distributed training):
            the codes then need not follow the encoder's scale, whatever it grows to,
            and the quantized output is in that standardised scale. True or False.

    Raises:
        ConfigError: an option outside the range given above, `pre_norm` not a bool, or
            `directional_reparam` with `rotation_trick`, `cosine` or no dead-code
            replacement.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.VectorQuantizer(16, codebook_size=64, kmeans_init=True)
        >>> quantized, indices, loss = q(torch.randn(128, 16))
        >>> indices.shape, int(indices.max()) < 64, q.codes.shape
        (torch.Size([128]), True, torch.Size([64, 16]))
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        decay: float | None = 0.99,
        commitment_weight: float = 0.25,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        cosine: bool = False,
        rotation_trick: bool = False,
        commitment_reduction: str = "mean",
        cluster_size_init: str = "ones",
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_int(name, "dim", dim, 1)
        self.dim = dim
        self.codebook_size = codebook_size
        self.commitment_weight = check_number(name, "commitment_weight", commitment_weight, 0)
        self.cosine = cosine
        self.rotation_trick = rotation_trick
        check(
            commitment_reduction in REDUCTIONS,
            f"{name}: commitment_reduction={commitment_reduction!r}, allowed: "
            f"{', '.join(REDUCTIONS)}",
        )
        self.commitment_reduction = commitment_reduction
        self.directional_reparam = directional_reparam
        # with DiVeQ the codebook learns by its gradient; decay then sets the usage horizon only
        self.directional_reparam_variance, decay, usage_decay = directional_decays(
            name, directional_reparam, directional_reparam_variance, rotation_trick, cosine,
            dead_code_threshold, decay,
        )  # fmt: skip
        self.project_in, self.project_out = projections(dim, codebook_dim, name)
        self.pre_norm = batch_norm(name, pre_norm, codebook_dim or dim)
        self.codebook = Codebook(
            codebook_size,
            codebook_dim or dim,
            decay=decay,
            usage_decay=usage_decay,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            dead_code_threshold=dead_code_threshold,
            cosine=cosine,
            owner=name,
            cluster_size_init=cluster_size_init,
        )

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = pre_normalise(self.pre_norm, self.project_in(x))
        if self.cosine:
            z = unit_rows(z)
        codes, indices = self.codebook(z[None])
        codes, indices = codes[0].to(z.dtype), indices[0]
        if self.directional_reparam:  # no loss: the codebook learns through the output
            if self.training:
                out = diveq(z, codes, self.directional_reparam_variance)
            else:
                out = straight_through(z, codes)
            return self.project_out(out), indices, z.new_zeros((), dtype=torch.float32)
        if not (self.codebook.learned or self.rotation_trick):  # one autograd node for both
            out, loss = straight_through_loss(
                z, codes, self.commitment_weight, self.commitment_reduction
            )
            return self.project_out(out), indices, loss
        loss = commitment_loss(
            z, codes, self.commitment_weight, self.codebook.learned, self.commitment_reduction
        )
        return self.project_out(estimate(z, codes, self.rotation_trick)), indices, loss

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(...,)`` to ``(..., dim)``: the codes through the output projection."""
        flat = self._check_indices(indices).to(self.codebook.embed.device)
        codes = self.codebook.embed[0][flat]
        return self.project_out(codes).reshape(*indices.shape, self.dim)

    @property
    def codes(self) -> Tensor:
        """The codebook ``(codebook_size, codebook_dim)``, detached."""
        return self.codebook.embed[0].detach()


__all__ = ["VectorQuantizer"]
