"""How gradients pass from a code back to its input, and the commitment losses.

- :func:`straight_through`: value the code, gradient the identity.
- :func:`rotation_trick` (Fifty et al. 2024): value the code, gradient through the
  rotation and scaling that carry the input onto it.
- :func:`directional_reparam` (DiVeQ, Vali et al. 2025): value about the code, the input
  plus the error's length along a noisy, constant direction; gradient to input and code.
- :func:`commitment_loss`: ``weight |z - sg(c)|^2`` (plus the codebook term for a learned
  codebook), and :func:`residual_commitment_loss`, the same for residual levels in one pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum")  # of the commitment loss; "sum" reproduces the failure


def l2norm(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / ||x||`` over the last dim (zero rows stay zero)."""
    return F.normalize(x, dim=-1, eps=eps)


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


__all__ = [
    "REDUCTIONS", "commitment_loss", "directional_reparam", "estimate", "l2norm",
    "residual_commitment_loss", "rotation_trick", "straight_through",
]  # fmt: skip
