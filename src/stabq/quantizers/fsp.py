"""Finite scalar perturbation (Zhai et al. 2026, "VP-VAE", arXiv 2602.17133).

Each of ``d = len(levels)`` dimensions goes through a CDF ``F`` to ``[0, 1]`` and falls
into one of ``L`` equal bins; its value is the bin's midpoint:

    a     = F(z)                                 (tanh, sigmoid, normal, laplace, cauchy)
    k     = floor(clamp(a, 0, 1 - eps) L)        (level index in [0, L))
    m     = (k + 0.5) / L                        (straight through: gradient 1 to a)
    code  = (m - 0.5) / sqrt(1/12)               (unit variance for uniform a)
       or = F^-1(clamp(m, eps, 1 - eps))         (inverse_activation; straight through to z)
    index = sum_i k_i prod_{j<i} L_j             (mixed radix)

In training with ``quantize_rate = r < 1`` a share ``1 - r`` of the values is not the
midpoint but the activation moved by ``u / (2L)``, ``u ~ U(-1, 1)`` (kept where it stays in
``(0, 1)``, else the activation itself). The loss pulls each dimension's batch moments to
targets (:data:`MOMENT_TARGETS`) so that ``a`` is near uniform and the bins are used evenly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from stabq import distributed
from stabq.errors import check, is_int
from stabq.quantizers.base import Quantizer
from stabq.quantizers.fsq import (
    fsq_indices_to_levels,
    fsq_level_indices_to_index,
    grid_dtype,
    pre_normalise,
)

UNIFORM_STD = 0.28867513459481287  # sqrt(1 / 12), the standard deviation of U(0, 1)
_SQRT2 = math.sqrt(2.0)
# the moments are taken of z clamped to +-1e8, where every CDF has long saturated: the loss
# then stays finite in float32 for any finite input (variance term below 1e35)
MOMENT_BOUND = 1e8
MOMENT_EPS = 1e-8  # the smallest standard deviation the skewness and kurtosis divide by


def _tanh(z: Tensor) -> Tensor:
    return (torch.tanh(z) + 1.0) / 2.0


def _tanh_inverse(p: Tensor) -> Tensor:
    return torch.arctanh(p * 2.0 - 1.0)


def _normal(z: Tensor) -> Tensor:
    return (1.0 + torch.erf(z / _SQRT2)) / 2.0


def _normal_inverse(p: Tensor) -> Tensor:
    return torch.erfinv(2.0 * p - 1.0) * _SQRT2


def _laplace(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.sign(z) * (1.0 - torch.exp(-torch.abs(z))))


def _laplace_inverse(p: Tensor) -> Tensor:
    return -torch.sign(p - 0.5) * torch.log(1.0 - 2.0 * torch.abs(p - 0.5))


def _cauchy(z: Tensor) -> Tensor:
    return torch.arctan(z) / torch.pi + 0.5


def _cauchy_inverse(p: Tensor) -> Tensor:
    return torch.tan((p - 0.5) * torch.pi)


# name -> (CDF: R -> [0, 1], its inverse: (0, 1) -> R), the peer's operations
CDFS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "tanh": (_tanh, _tanh_inverse),
    "sigmoid": (torch.sigmoid, torch.logit),
    "normal": (_normal, _normal_inverse),
    "laplace": (_laplace, _laplace_inverse),
    "cauchy": (_cauchy, _cauchy_inverse),
}

# name -> (targets, weights) of the mean, variance, skewness and excess kurtosis: the
# variance targets are those of the distribution whose CDF each activation is (logistic of
# scale 1/2 for tanh: pi^2 / 12; of scale 1 for sigmoid: pi^2 / 3; Laplace: 2)
MOMENT_TARGETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "none": ((0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)),
    "var": ((0.0, 1.0, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
    "kurt": ((0.0, 1.0, 0.0, 0.0), (0.1, 0.07, 0.06, 0.05)),
    "var_tanh": ((0.0, 0.8225, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
    "var_sigmoid": ((0.0, 3.29, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
    "var_laplace": ((0.0, 2.0, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
}


def straight_through(value: Tensor, source: Tensor) -> Tensor:
    """``value`` exactly in the forward, the gradient of ``source`` in the backward."""
    return value.detach() + (source - source.detach())


def fsp_bins(act: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """Level indices ``k`` (float, ``(n, d)``, in ``[0, L)``) and bin midpoints
    ``(k + 0.5) / L`` of activations ``act`` in ``[0, 1]``; ``levels`` int ``(d,)``."""
    eps = torch.finfo(act.dtype).eps
    level_idx = (act.detach().clamp(0.0, 1.0 - eps) * levels).floor()
    return level_idx, (level_idx + 0.5) / levels


def fsp_perturb(
    act: Tensor,
    values: Tensor,
    levels: Tensor,
    shift_draw: Tensor,
    keep_draw: Tensor,
    quantize_rate: float,
) -> Tensor:
    """Training values: ``act + (2 shift_draw - 1) / (2L)`` where that stays in ``(0, 1)``
    (else ``act``), taken where ``keep_draw > quantize_rate``, else ``values``.

    ``shift_draw`` and ``keep_draw`` are uniform draws in ``[0, 1)`` of ``act``'s shape
    ``(n, d)``; the perturbed values carry ``act``'s gradient."""
    half_bin = 1.0 / (levels.to(act.dtype) * 2)
    proposal = act + half_bin * (shift_draw * 2.0 - 1.0)
    inside = (proposal > 0.0) & (proposal < 1.0)
    perturbed = torch.where(inside, proposal, act)
    return torch.where(keep_draw > quantize_rate, perturbed, values)


def fsp_values_to_codes(values: Tensor, inverse_of: str | None) -> Tensor:
    """Values in ``[0, 1]`` to codes: ``(v - 0.5) / sqrt(1/12)``, or with ``inverse_of``
    (an activation name) its inverse CDF of ``v`` clamped to ``[eps, 1 - eps]``."""
    if inverse_of is None:
        return (values - 0.5) / UNIFORM_STD
    eps = torch.finfo(values.dtype).eps
    return CDFS[inverse_of][1](values.clamp(eps, 1.0 - eps))


def _summed(t: Tensor, sync: bool) -> Tensor:
    return distributed.sum_over_ranks(t) if sync else t


def batch_moments(z: Tensor, orders: int, sync: bool = False) -> tuple[list[Tensor], float]:
    """Per-dimension mean, unbiased variance, skewness and excess kurtosis of ``z`` ``(n, d)``
    (the first ``orders`` of them), and the row count; ``sync``: over every rank's rows
    (one differentiable all-reduce per order up to 3; every rank must enter them).

    Skewness and kurtosis are the means of ``((z - mean) / max(std, 1e-8))^3`` and
    ``^4`` (minus 3), as the peer's. With fewer than 2 rows, no moments (``[]``)."""
    sums, rows = distributed.sum_rows_over_ranks(z.sum(0), z.shape[0], sync)
    if rows < 2 or orders < 1:
        return [], rows
    mean = sums / rows
    if orders < 2:
        return [mean], rows
    centred = z - mean
    variance = _summed(centred.pow(2).sum(0), sync) / (rows - 1)
    if orders < 3:
        return [mean, variance], rows
    scores = centred / variance.sqrt().clamp_min(MOMENT_EPS)
    high = _summed(torch.stack([scores.pow(3).sum(0), scores.pow(4).sum(0)]), sync) / rows
    return [mean, variance, high[0], high[1] - 3.0], rows


def moment_loss(z: Tensor, vector_norm: str, sync: bool = False) -> Tensor:
    """``sum_k w_k mean_d (moment_k - target_k)^2`` of ``z`` ``(n, d)``'s batch moments
    (:func:`batch_moments` of ``z`` clamped to +-:data:`MOMENT_BOUND`, in float32 or
    float64) for the preset ``vector_norm`` of :data:`MOMENT_TARGETS`: 0-dim float32, >= 0.

    Terms of weight 0 are left out; with fewer than 2 rows (over all ranks when ``sync``)
    the loss is 0 (under ``sync`` kept in the graph, so that every rank's backward enters
    the same all-reduces)."""
    targets, weights = MOMENT_TARGETS[vector_norm]
    orders = max((k + 1 for k, w in enumerate(weights) if w), default=0)
    dtype = torch.promote_types(z.dtype, torch.float32)
    bounded = z.clamp(-MOMENT_BOUND, MOMENT_BOUND).to(dtype)
    moments, _ = batch_moments(bounded, orders, sync)
    if not moments:  # under sync, kept in the graph: every rank's backward enters the same
        return (0.0 * bounded.sum()).float() if sync else z.new_zeros((), dtype=torch.float32)
    terms = [
        ((m - t) ** 2).mean() * w for m, t, w in zip(moments, targets, weights, strict=False) if w
    ]
    return sum(terms[1:], terms[0]).float()


def _check_options(
    levels: object, activation: object, quantize_rate: object, vector_norm: object
) -> list[int]:
    if isinstance(levels, Sequence) and not isinstance(levels, str):
        levels = list(levels)
    allowed = "allowed is a non-empty list of integers >= 2"
    check(isinstance(levels, list) and len(levels) > 0, f"FSP: levels={levels!r}, {allowed}")
    check(all(is_int(v) and v >= 2 for v in levels), f"FSP: levels={levels!r}, {allowed}")
    size = math.prod(levels)
    check(size < 2**62, f"FSP: levels={levels!r} give {size} codes, allowed is fewer than 2**62")
    check(
        isinstance(activation, str) and activation in CDFS,
        f"FSP: activation={activation!r}, allowed is one of {', '.join(CDFS)}",
    )
    check(
        isinstance(quantize_rate, float | int)
        and not isinstance(quantize_rate, bool)
        and 0.0 <= quantize_rate <= 1.0,
        f"FSP: quantize_rate={quantize_rate!r}, allowed is a number in [0, 1]",
    )
    check(
        isinstance(vector_norm, str) and vector_norm in MOMENT_TARGETS,
        f"FSP: vector_norm={vector_norm!r}, allowed is one of {', '.join(MOMENT_TARGETS)}",
    )
    return levels


class FSP(Quantizer):
    """Finite scalar perturbation (Zhai et al. 2026, VP-VAE): each code dimension through a
    CDF to [0, 1] and onto the midpoint of one of its levels' equal bins; in training the
    activation is perturbed within half a bin instead; a fixed grid, nothing to collapse.

    `a = F(z)` for a CDF `F` (`activation`); bin `k = floor(a L)`, value `(k + 0.5) / L`
    (straight through), code `(value - 0.5) / sqrt(1/12)` or, with `inverse_activation`,
    `F^-1(value)`. In training a share `1 - quantize_rate` of the values is `a + u / (2L)`,
    `u ~ U(-1, 1)` (`a` where that leaves (0, 1)), not the bin's midpoint: the training
    output is noisy, the eval output quantized. The indices are always the bins of `a`.
    The loss pulls each code dimension's batch mean, variance (and with `"kurt"` skewness
    and kurtosis) to the targets of `vector_norm`, so that `a` spreads evenly over the
    bins; every rank's rows together in distributed training; 0 for fewer than 2 rows.

    Args:
        levels: bins per code dimension, each an integer >= 2; `prod(levels)` codes
            (fewer than 2**62).
        dim: input size (default None: `len(levels)`); when it differs from
            `len(levels)`, Linear layers project `dim -> len(levels)` before and back
            after quantizing.
        activation: the CDF: `"tanh"` (`(tanh z + 1) / 2`), `"sigmoid"`, `"normal"`,
            `"laplace"` or `"cauchy"`.
        quantize_rate: the share of training values quantized, not perturbed, a number
            in [0, 1]; 0 (the default) perturbs them all, 1 trains on the codes.
        inverse_activation: map the values back through the inverse CDF (gradients
            straight through to the projected input) instead of rescaling them to unit
            variance.
        vector_norm: the moment loss: `"var_tanh"` (mean 0 weight 0.1, variance
            pi^2/12 weight 0.07: the variance for which the tanh CDF gives uniform
            activations), `"var"` (variance 1, for `"normal"`), `"var_sigmoid"` (3.29),
            `"var_laplace"` (2), `"kurt"` (variance 1, skewness 0 weight 0.06, excess
            kurtosis 0 weight 0.05) or `"none"`.
        pre_norm: standardise each code dimension over the batch before the CDF (BatchNorm
            without affine, running statistics at eval; every rank's rows together), as
            `FSQ`'s option. Default False.

    Raises:
        ConfigError: `levels` empty or not integers >= 2, too many codes, `dim` not an
            integer >= 1, an unknown `activation` or `vector_norm`, `quantize_rate`
            outside [0, 1], or `pre_norm` not a boolean.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.FSP([8, 5, 5, 5], dim=32, activation="normal", vector_norm="var")
        >>> out = q(torch.randn(16, 32))
        >>> q.codebook_size, out.indices.shape, out.indices.dtype, out.loss.shape
        (1000, torch.Size([16]), torch.int64, torch.Size([]))
        >>> q = q.eval()
        >>> out = q(torch.randn(16, 32))
        >>> torch.equal(q.indices_to_codes(out.indices), out.quantized)
        True
    """

    grid = True  # prod(levels) fixed cells: health reports occupied cells, not dead codes

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        activation: str = "tanh",
        quantize_rate: float = 0.0,
        inverse_activation: bool = False,
        vector_norm: str = "var_tanh",
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        levels = _check_options(levels, activation, quantize_rate, vector_norm)
        dim = len(levels) if dim is None else dim
        check(
            is_int(dim) and dim >= 1,
            f"FSP: dim={dim!r}, allowed is an integer >= 1 (or None for len(levels))",
        )
        check(
            isinstance(inverse_activation, bool),
            f"FSP: inverse_activation={inverse_activation!r}, allowed is true or false",
        )
        check(isinstance(pre_norm, bool), f"FSP: pre_norm={pre_norm!r}, allowed is true or false")
        self.levels, self.dim, self.codebook_size = levels, dim, math.prod(levels)
        self.activation, self.quantize_rate = activation, float(quantize_rate)
        self.inverse_activation, self.vector_norm = inverse_activation, vector_norm
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        has_projection = dim != len(levels)
        self.project_in = nn.Linear(dim, len(levels)) if has_projection else nn.Identity()
        self.project_out = nn.Linear(len(levels), dim) if has_projection else nn.Identity()
        self.pre_norm = nn.BatchNorm1d(len(levels), affine=False) if pre_norm else None

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        return grid_dtype(self.project_in, self.pre_norm, x)

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = pre_normalise(self.pre_norm, self.project_in(x))
        loss = moment_loss(z, self.vector_norm, self.training and distributed.is_distributed())
        act = CDFS[self.activation][0](z)
        level_idx, midpoints = fsp_bins(act, self._levels)
        values = straight_through(midpoints, act)
        if self.training and self.quantize_rate < 1.0:  # the peer's two draws, in its order
            shift_draw, keep_draw = torch.rand_like(act), torch.rand_like(act)
            values = fsp_perturb(
                act, values, self._levels, shift_draw, keep_draw, self.quantize_rate
            )
        if self.inverse_activation:
            codes = straight_through(fsp_values_to_codes(values.detach(), self.activation), z)
        else:
            codes = fsp_values_to_codes(values, None)
        return self.project_out(codes), fsq_level_indices_to_index(level_idx, self._levels), loss

    def indices_to_level_codes(self, indices: Tensor) -> Tensor:
        """Indices `(...,)` to the codes `(..., len(levels))` before `project_out`."""
        flat = self._check_indices(indices)
        dtype = self.compute_dtype(flat.float())
        level_idx = fsq_indices_to_levels(flat.to(self._levels.device), self._levels)
        midpoints = (level_idx.to(dtype) + 0.5) / self._levels
        inverse_of = self.activation if self.inverse_activation else None
        return fsp_values_to_codes(midpoints, inverse_of).reshape(*indices.shape, -1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices `(...,)` to `(..., dim)`: the bin midpoints' codes through `project_out`."""
        return self.project_out(self.indices_to_level_codes(indices))

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, dim={self.dim}, activation={self.activation!r}, "
            f"quantize_rate={self.quantize_rate}, inverse_activation={self.inverse_activation}, "
            f"vector_norm={self.vector_norm!r}, pre_norm={self.pre_norm is not None}"
        )


__all__ = [
    "CDFS",
    "FSP",
    "MOMENT_TARGETS",
    "batch_moments",
    "fsp_bins",
    "fsp_perturb",
    "fsp_values_to_codes",
    "moment_loss",
    "straight_through",
]
