"""How gradients pass from a code back to its input, and the commitment losses.

- :func:`straight_through`: value the code, gradient the identity.
- :func:`rotation_trick` (Fifty et al. 2024): value the code, gradient through the
  rotation and scaling that carry the input onto it.
- :func:`directional_reparam` (DiVeQ, Vali et al. 2025): value about the code, the input
  plus the error's length along a noisy, constant direction; gradient to input and code.
  :func:`check_directional` and :func:`directional_decays` check its options and set the
  codebook it trains.
- :func:`commitment_loss`: ``weight |z - sg(c)|^2`` (plus the codebook term for a learned
  codebook), and :func:`residual_commitment_loss`, the same for residual levels in one pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from stabq.errors import check, check_number

REDUCTIONS = ("mean", "sum")  # of the commitment loss; "sum" reproduces the failure


def l2norm(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / ||x||`` over the last dim (zero rows stay zero)."""
    return F.normalize(x, dim=-1, eps=eps)


class _UnitRows(torch.autograd.Function):
    """:func:`l2norm`'s value, ``y = x / max(|x|, eps)``, in one autograd node; backward
    ``(g - y (y . g)) / |x|`` per row, and ``g / eps`` where ``|x| < eps`` (the clamp holds
    the denominator): autograd's gradient through ``F.normalize``, in three fewer nodes."""

    @staticmethod
    def forward(ctx, x, eps):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        denom = norm.clamp_min(eps)
        y = x / denom
        ctx.save_for_backward(y, denom, norm < eps)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, denom, held = ctx.saved_tensors
        along = (y * grad).sum(-1, keepdim=True).masked_fill_(held, 0)
        return torch.addcmul(grad, y, along, value=-1).div_(denom), None


def unit_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """:func:`l2norm` (``x / max(|x|, eps)`` over the last dim) as one autograd node where
    ``x`` needs a gradient; the values are :func:`l2norm`'s, the gradient autograd's up to
    float rounding."""
    if x.requires_grad and torch.is_grad_enabled():
        return _UnitRows.apply(x, eps)
    return l2norm(x, eps)


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Value ``q``, gradient the identity to ``x``."""
    return x + (q - x).detach()


def rotation_trick(x: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """Value ``q``, gradient through ``lambda R`` with R rotating ``x/|x|`` onto ``q/|q|``.

    ``R = I - 2 w w^T + 2 v u^T`` with ``u = x/|x|``, ``v = q/|q|``,
    ``w = (u + v)/|u + v|`` and ``lambda = |q|/|x|``, all held constant
    (Fifty et al. 2024, "Restructuring vector quantization with the rotation
    trick"). Rows of ``x``, ``q``: ``(..., d)``. A row with ``|x| < eps`` has no
    direction to rotate (and ``lambda`` would explode): it passes straight through.
    """
    x_det, q_det = x.detach(), q.detach()
    x_norm = x_det.norm(dim=-1, keepdim=True)
    q_norm = q_det.norm(dim=-1, keepdim=True)
    u = x_det / x_norm.clamp_min(eps)
    v = q_det / q_norm.clamp_min(eps)
    w = l2norm(u + v)
    rotated = x - 2 * w * (w * x).sum(-1, keepdim=True) + 2 * v * (u * x).sum(-1, keepdim=True)
    out = torch.where(x_norm < eps, x, (q_norm / x_norm.clamp_min(eps)) * rotated)
    return out + (q - out).detach()  # exact value q, gradient of the rotation


def directional_reparam(
    x: Tensor, q: Tensor, variance: float = 5e-3, generator: torch.Generator | None = None
) -> Tensor:
    """DiVeQ's quantized value: the input plus the error's length along a noisy direction.

    ``out = x + sg(unit(q - x + sqrt(variance) n)) |q - x|`` with ``n ~ N(0, I)`` and
    ``sg`` the stop-gradient (Vali et al. 2025, "DiVeQ: differentiable vector
    quantization using the reparameterization trick"; vector-quantize-pytorch's
    ``directional_reparam``). ``out`` lies at distance ``|q - x|`` from ``x``, within
    ``2 sqrt(variance) |n|`` of ``q``, and is ``q`` (up to rounding) at ``variance=0``.
    The gradient reaches ``x`` (the identity plus ``d|q - x| / dx`` along the direction)
    and ``q`` (``d|q - x| / dq`` along it), so a codebook learns without a codebook loss.
    A row with ``q = x`` gives ``out = x``. The noise is drawn even at ``variance=0``.

    Args:
        x: inputs ``(..., d)``.
        q: their codes ``(..., d)``, differentiable to learn the codebook.
        variance: variance of the noise on the direction, a number >= 0.
        generator: the random generator of the noise (default: torch's global one).

    Returns:
        ``(..., d)``, the dtype of ``x - q``.

    Examples:
        >>> import torch
        >>> x, q = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])
        >>> directional_reparam(x, q, variance=0.0)
        tensor([[3., 4.]])
        >>> float(directional_reparam(x, q).norm())  # |q - x|, whatever the noise
        5.0
    """
    error = q - x
    noise = torch.randn(error.shape, generator=generator, dtype=error.dtype, device=error.device)
    noisy = (error + math.sqrt(variance) * noise).detach()
    direction = l2norm(noisy / _largest(noisy))
    error_scale = _largest(error.detach())
    return x + direction * ((error / error_scale).norm(dim=-1, keepdim=True) * error_scale)


def _largest(x: Tensor) -> Tensor:
    """The largest ``|x_i|`` of each row ``(..., 1)``, at least the smallest normal number:
    norms of rows scaled by it cannot overflow (rows of 1e30 in float32)."""
    return x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class _ResidualLoss(torch.autograd.Function):
    """Forward: a ``value`` computed without autograd. Backward: ``grad * scale * r`` to ``z``."""

    @staticmethod
    def forward(ctx, z, residual_sum, value, scale):
        ctx.save_for_backward(residual_sum)
        ctx.scale, ctx.dtype = scale, z.dtype
        return value

    @staticmethod
    def backward(ctx, grad):
        (residual_sum,) = ctx.saved_tensors
        return residual_sum.mul(grad * ctx.scale).to(ctx.dtype), None, None, None


def residual_commitment_loss(
    z: Tensor, residual_sum: Tensor, squared_sum: Tensor, weight: float, reduction: str = "mean"
) -> Tensor:
    """``weight * sum_l mean(r_l^2)`` for residuals ``r_l = z - sg(t_l)``, 0-dim float32.

    Takes ``sum_l r_l`` (shaped like ``z``) and ``sum_l |r_l|^2``, computed by
    the caller without autograd; the gradient to ``z``,
    ``2 weight / z.numel() * sum_l r_l``, costs one pass, where autograd through
    one ``mse_loss`` per level costs several. EMA codebooks only: codes get no gradient.
    ``reduction="sum"``: ``weight * sum_l sum(r_l^2)`` over the whole batch, gradient
    ``2 weight sum_l r_l`` (:data:`REDUCTIONS`; reproduces the failure, never use).
    """
    if not z.numel():
        return z.new_zeros((), dtype=torch.float32)
    n = z.numel() if reduction == "mean" else 1
    value = (squared_sum.float() * (weight / n)).reshape(())
    return _ResidualLoss.apply(z, residual_sum, value, 2 * weight / n)


class _StraightThroughLoss(torch.autograd.Function):
    """Forward: ``z + (codes - z)`` (:func:`straight_through`'s value) and a loss ``value``
    computed without autograd. Backward: the output's gradient to ``z`` as it is, plus the
    loss's times ``scale * residual`` (:class:`_ResidualLoss`'s), in one node."""

    @staticmethod
    def forward(ctx, z, delta, residual, value, scale):
        ctx.set_materialize_grads(False)  # an unused output passes no gradient, as apart
        ctx.save_for_backward(residual)
        ctx.scale, ctx.dtype = scale, z.dtype
        return z + delta, value

    @staticmethod
    def backward(ctx, grad, grad_loss):
        (residual,) = ctx.saved_tensors
        if grad_loss is not None:
            from_loss = residual.mul(grad_loss * ctx.scale).to(ctx.dtype)
            grad = from_loss if grad is None else grad + from_loss
        return grad, None, None, None, None


def straight_through_loss(
    z: Tensor,
    codes: Tensor,
    weight: float,
    reduction: str = "mean",
    residual: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(straight_through(z, codes), loss)`` in one autograd node, the same values and
    gradients as the two apart (EMA codebooks: ``codes`` take no gradient).

    The loss is :func:`commitment_loss`'s ``weight |z - sg(codes)|^2`` or, given
    ``residual = (sum_l r_l, sum_l |r_l|^2)``, :func:`residual_commitment_loss`'s. For
    float32 ``z`` and ``codes`` one difference serves both: ``z - codes`` is exactly
    ``-(codes - z)``."""
    n = z.numel() if reduction == "mean" else 1
    with torch.no_grad():
        delta = codes.detach() - z.detach()
        if residual is not None:
            residual_sum, squared, scale = residual[0], residual[1], 2 * weight / max(n, 1)
        elif z.dtype == codes.dtype == torch.float32:
            residual_sum, scale = delta, -2 * weight / max(n, 1)
            squared = delta.reshape(-1).dot(delta.reshape(-1))
        else:
            residual_sum, scale = z.float() - codes.float(), 2 * weight / max(n, 1)
            squared = residual_sum.reshape(-1).dot(residual_sum.reshape(-1))
    if not z.numel():
        return straight_through(z, codes), z.new_zeros((), dtype=torch.float32)
    value = (squared.float() * (weight / n)).reshape(())
    return _StraightThroughLoss.apply(z, delta, residual_sum, value, scale)


def commitment_loss(
    z: Tensor, codes: Tensor, weight: float, learned: bool, reduction: str = "mean"
) -> Tensor:
    """``weight |z - sg(c)|^2``, plus ``|sg(z) - c|^2`` for a learned codebook; float32.

    ``reduction="mean"`` averages over every element of ``z`` ``(..., d)``; ``"sum"``
    sums over the whole batch, as tutorials write ``beta * ((z - sg(q))**2).sum()``:
    the loss and its gradient grow with the batch and the code size (reproduces the
    failure; never use).
    """
    if learned and z.numel():
        z, codes = z.float(), codes.float()
        return weight * F.mse_loss(z, codes.detach(), reduction=reduction) + F.mse_loss(
            codes, z.detach(), reduction=reduction
        )
    with torch.no_grad():
        residual = z.float() - codes.float()
        squared = residual.reshape(-1).dot(residual.reshape(-1))
    return residual_commitment_loss(z, residual, squared, weight, reduction)


def estimate(z: Tensor, codes: Tensor, rotation: bool) -> Tensor:
    """Value ``codes``; gradient to ``z`` by the rotation trick or straight through."""
    return rotation_trick(z, codes) if rotation else straight_through(z, codes)


def check_directional(
    owner: str, variance: object, rotation: bool, cosine: bool, dead_code_threshold: object
) -> float:
    """Validate the DiVeQ options (``directional_reparam=True``); returns the variance.

    DiVeQ passes gradients its own way (not with the rotation trick) to a codebook
    learned by gradient (not on the unit sphere, which a gradient step leaves), and a
    code reached by no input gets no gradient: dead codes must be replaced.
    """
    check(
        not rotation,
        f"{owner}: rotation_trick=True with directional_reparam=True, allowed is one of them",
    )
    check(
        not cosine,
        f"{owner}: cosine=True with directional_reparam=True, allowed is False "
        "(a codebook learned by gradient leaves the unit sphere)",
    )
    check(
        isinstance(dead_code_threshold, float | int) and dead_code_threshold > 0,
        f"{owner}: dead_code_threshold={dead_code_threshold!r} with directional_reparam=True, "
        "allowed is a number > 0 (unused codes get no gradient and must be replaced)",
    )
    return check_number(owner, "directional_reparam_variance", variance, 0)


def directional_decays(
    owner: str,
    enabled: bool,
    variance: object,
    rotation: bool,
    cosine: bool,
    dead_code_threshold: object,
    decay: float | None,
) -> tuple[object, float | None, float]:
    """``(variance, decay, usage_decay)`` for a codebook with DiVeQ ``enabled`` or not.

    With DiVeQ the options are checked (:func:`check_directional`) and the codebook learns
    by its gradient (``decay`` None); the given ``decay`` (None: 0.99) then only sets the
    horizon its use is counted over. Without, everything passes as given.
    """
    if not enabled:
        return variance, decay, 0.99
    variance = check_directional(owner, variance, rotation, cosine, dead_code_threshold)
    return variance, None, 0.99 if decay is None else decay


__all__ = [
    "REDUCTIONS", "check_directional", "commitment_loss", "directional_decays",
    "directional_reparam", "estimate", "l2norm", "residual_commitment_loss", "rotation_trick",
    "straight_through", "straight_through_loss", "unit_rows",
]  # fmt: skip
