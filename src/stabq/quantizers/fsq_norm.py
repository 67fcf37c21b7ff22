"""FSQ's ``pre_norm`` folded into its bound and round: one autograd Function for both.

``pre_norm`` is a BatchNorm without affine: ``zn = (z - mean) * invstd``, ``invstd =
1 / sqrt(var + eps)``, with the batch's mean and biased variance in training (the running
averages take a step towards the mean and the unbiased variance, as ``nn.BatchNorm1d``
does) and the running ones at eval. The bound then computes ``tanh(a zn + shift)``
(``a = 1``, or 0.8 for ``bound="distribution"``), which is ``tanh(u)`` with

    u = c * s + t,   c = z - mean, s = a invstd, t = shift      (training)
    u = z * s + t,   s = a invstd, t = shift - a mean invstd     (eval: running statistics)

so the normalisation costs the statistics' passes and no pass of its own: the bound's
first pass computes ``u`` where it computed ``z + shift``. Backward is BatchNorm's
gradient, ``invstd (g - mean(g) - zn mean(g zn))`` with ``g`` the gradient reaching ``zn``,
from the centred ``c`` kept by forward; at eval ``g invstd``.

The results are those of ``nn.BatchNorm1d`` followed by the bound up to float rounding
(the statistics are summed in another order, and ``u`` is rounded once where the unfused
form rounds ``zn`` and then ``zn + shift``): an input within an ulp or so of a rounding
boundary may take the neighbouring code. ``tests/test_fsq_fused_norm.py`` compares both.

Below :data:`PACKED_MIN_ELEMENTS` elements the Function is :class:`_NativeNormBoundRound`:
the same clamp, torch's own batch norm and its backward, and the bound, in one autograd
node. It runs the unfused form's operations on the same values, so its codes, indices,
running statistics and gradients are the unfused form's bit for bit
(``tests/test_fsq_native_norm.py``); what it saves is the autograd nodes, the Python of
the module calls and the clamp's four-operation backward: the cost of a small batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stabq import distributed
from stabq.quantizers._graph import graph_kept
from stabq.quantizers.fsq_kernel import DISTRIBUTION_SCALE, _RoundIndex, _Tiled, bound_round

# Below this many elements of ``z`` torch's own batch norm, one native call, costs less than
# the packed form's dozen small operations for the statistics (CPU, float32, torch 2.13:
# 7 us against 45 us at 128 x 6); above it the native call's per-dimension strided loop
# over ``(n, d)`` costs more than the packed passes (670 us against 100 us at 16,384 x 6).
PACKED_MIN_ELEMENTS = 2**13


def fusable(norm: nn.Module | None, z: Tensor) -> bool:
    """Does :func:`norm_bound_round` stand for ``pre_normalise(norm, z)`` before the bound?

    For stabq's own ``pre_norm`` (a BatchNorm1d without affine that tracks running
    statistics) on float32 or float64 elements on the CPU, outside distributed training,
    at every size."""
    return (
        z.device.type == "cpu"
        and z.dtype in (torch.float32, torch.float64)
        and type(norm) is nn.BatchNorm1d
        and not norm.affine
        and norm.track_running_stats
        and z.shape[0] >= (2 if norm.training else 1)
        and not (norm.training and distributed.is_distributed())
    )


def _clamp_limit(z: Tensor) -> float:
    """``pre_normalise``'s clamp: beyond it the batch variance would overflow."""
    return math.sqrt(torch.finfo(z.dtype).max) / 1024


def _batch_terms(norm: nn.BatchNorm1d, z: Tensor, g: int, d: int, a: float) -> tuple | None:
    """Training: the centred packed ``z``, the tiled scale ``s = a invstd`` and backward's
    per-dimension factors ``(2, d)``, with the running averages updated; None (nothing
    updated) where ``pre_normalise``'s clamp would change ``z``."""
    n = z.shape[0] * g
    mean = z.sum(0).view(g, d).sum(0).div_(n)
    c = z - mean.repeat(g)
    squares = (c * c).sum(0).view(g, d).sum(0)
    # no |z_i| passes |mean| + sqrt(sum (z - mean)^2): beyond the clamp's limit the
    # unfused form runs instead (margin for the sums' rounding; NaN and inf fail too)
    if not float((squares.sqrt().add_(mean.abs())).max()) * 1.01 < _clamp_limit(z):
        return None
    var = squares.div_(n)
    norm.num_batches_tracked.add_(1)
    momentum = norm.momentum
    step = 1.0 / float(norm.num_batches_tracked) if momentum is None else momentum
    norm.running_mean.mul_(1 - step).add_(mean, alpha=step)
    norm.running_var.mul_(1 - step).add_(var, alpha=step * n / (n - 1))
    invstd = var.add_(norm.eps).rsqrt_()
    # grad_z = invstd (g_zn - mean g_zn) - c invstd^3 mean(g_zn c), g_zn = a slope gy
    factors = torch.stack((invstd, invstd.pow(3))).mul_(-a / n)
    return c, (a * invstd).repeat(g), factors


class _NormBoundRound(torch.autograd.Function):
    """:class:`~stabq.quantizers.fsq_kernel._BoundRound` on ``u = x s + t`` (the module
    docstring): ``x`` the packed input (centred in training), ``s``, ``t`` tiled ``(g d,)``.
    ``factors`` ``(2, d)`` in training (BatchNorm's gradient, with ``g``), else None."""

    @staticmethod
    def forward(ctx, z, x, c: _Tiled, index, sigmoid: bool, s, t, factors, g: int):
        if sigmoid:
            y = torch.addcmul(2 * t, x, 2 * s).sigmoid_()
            b = torch.addcmul(c.sig_offset, y, c.two_half_l)
            r = torch.round(b)
            near = (b.sub_(r).abs_().amax(dim=1) > 0.5 - c.window).nonzero().squeeze(1)
            if near.numel():  # within the window of a tie: decide by tanh itself
                again = torch.addcmul(t, x.index_select(0, near), s).tanh_()
                r.index_copy_(0, near, torch.addcmul(c.neg_offset, again, c.half_l).round_())
        else:
            y = torch.addcmul(t, x, s).tanh_()
            r = torch.addcmul(c.neg_offset, y, c.half_l).round_()
        indices = index(r)
        ctx.sigmoid, ctx.g = sigmoid, g
        slope = c.four_slope if sigmoid else c.slope
        if factors is not None:  # BatchNorm's gradient: gy times a slope per dimension
            factors = factors * slope[: factors.shape[1]]
        ctx.save_for_backward(y, slope * s, x if factors is not None else None, factors)
        ctx.mark_non_differentiable(indices)
        return r.div_(c.half_width), indices

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        y, scale, x, factors = ctx.saved_tensors
        kernel = torch.ops.aten.sigmoid_backward if ctx.sigmoid else torch.ops.aten.tanh_backward
        kept = graph_kept()
        gy = kernel(grad, y) if kept else kernel.grad_input(grad, y, grad_input=y)
        if factors is None:  # running statistics: constants
            return gy.mul_(scale), *(None,) * 8
        g, d = ctx.g, factors.shape[1]
        sums = torch.stack((gy.sum(0), (gy * x).sum(0))).view(2, g, d).sum(1)
        coef = sums.mul_(factors).repeat(1, g)
        out = torch.addcmul(coef[0], x, coef[1], out=None if kept else x)
        return out.addcmul_(gy, scale), *(None,) * 8


def norm_bound_round(
    z: Tensor, norm: nn.BatchNorm1d, tiled: _Tiled, index: _RoundIndex, sigmoid: bool,
    g: int, bound: str,
) -> tuple[Tensor, Tensor] | None:  # fmt: skip
    """Codes and indices of ``norm(z)`` through the bound (packed ``(n / g, g d)`` codes),
    the running averages updated in training; None where the unfused form must run."""
    n, d = z.shape
    a = DISTRIBUTION_SCALE if bound == "distribution" else 1.0
    if z.numel() < PACKED_MIN_ELEMENTS:
        return _native(z, norm, tiled, index, g, a)
    packed = z.contiguous().view(n // g, g * d)
    if norm.training:
        terms = _batch_terms(norm, packed.detach(), g, d, a)
        if terms is None:
            return None
        x, s, factors = terms
        t = tiled.shift
    else:
        low, high = torch.aminmax(packed.detach())
        if not bool(torch.maximum(-low, high) <= _clamp_limit(z)):  # NaN fails too
            return None
        invstd = (norm.running_var + norm.eps).rsqrt()
        x, s, factors = packed, (a * invstd).repeat(g), None
        t = (tiled.shift[:d] - a * norm.running_mean * invstd).repeat(g)
    return _NormBoundRound.apply(packed, x, tiled, index, sigmoid, s, t, factors, g)


def _native(
    z: Tensor, norm: nn.BatchNorm1d, tiled: _Tiled, index: _RoundIndex, g: int, a: float,
    linear: tuple = (None,) * 4,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:class:`_NativeNormBoundRound` with ``norm``'s momentum as ``nn.BatchNorm1d`` takes it
    (counting the batch; ``1 / batches`` when its momentum is None); ``linear`` the weights
    and biases of the projections in and out to run in the same node, or Nones."""
    factor = 0.0
    if norm.training:
        norm.num_batches_tracked.add_(1)
        momentum = norm.momentum
        factor = 1.0 / float(norm.num_batches_tracked) if momentum is None else momentum
    stats = (norm.running_mean, norm.running_var, norm.training, factor, norm.eps)
    return _NativeNormBoundRound.apply(z.contiguous(), *linear, stats, tiled, index, g, a)


def native_projected(
    x: Tensor, norm: nn.BatchNorm1d, tiled: _Tiled, index: _RoundIndex, g: int, bound: str,
    project_in: nn.Linear, project_out: nn.Linear,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``project_out`` of the codes of ``norm(project_in(x))`` and the indices, all in one
    autograd node (below :data:`PACKED_MIN_ELEMENTS` code values, ``x`` contiguous): the
    same operations as the modules one after the other, the same values and gradients."""
    a = DISTRIBUTION_SCALE if bound == "distribution" else 1.0
    weights = (project_in.weight, project_in.bias, project_out.weight, project_out.bias)
    return _native(x, norm, tiled, index, g, a, weights)


class _NativeNormBoundRound(torch.autograd.Function):
    """``pre_normalise``'s clamp, torch's batch norm (running statistics updated in training)
    and the tanh form of the bound (``zn`` times ``a`` first where ``a != 1``), in one node;
    backward runs the same operations' backward formulas. ``z`` is ``(n, d)``; the bound
    runs on it packed ``g`` rows at a time, as the unfused form packs it. Given weights,
    ``z = x W_in^T + b_in`` first and ``codes W_out^T + b_out`` last, as ``nn.Linear``
    computes them (``addmm``), with ``addmm``'s gradients."""

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, stats, c: _Tiled, index, g: int, a: float):
        running_mean, running_var, training, momentum, eps = stats
        z = x if w_in is None else torch.addmm(b_in, x, w_in.t())
        limit = _clamp_limit(z)
        clamped = z.clamp(-limit, limit)
        zn, mean, invstd = torch.native_batch_norm(
            clamped, None, None, running_mean, running_var, training, momentum, eps
        )
        n, d = z.shape
        packed = zn.view(n // g, g * d)
        if a != 1.0:
            packed = packed.mul_(a)
        y, codes, indices = bound_round(packed, c, index, False)
        codes = codes.view(n, d)
        ctx.a, ctx.training, ctx.eps, ctx.limit = a, training, eps, limit
        running = (None, None) if training else (running_mean, running_var)
        linear = (x, w_in, codes, w_out) if w_in is not None else (None,) * 4
        ctx.save_for_backward(y, c.slope, z, clamped, mean, invstd, *running, *linear)
        ctx.mark_non_differentiable(indices)
        return (codes if w_out is None else torch.addmm(b_out, codes, w_out.t())), indices

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        y, slope, z, clamped, mean, invstd, r_mean, r_var, x, w_in, codes, w_out = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads_out = (None, None)
        if w_out is not None:  # addmm's gradients: grad W_out^T ... as autograd computes them
            grads_out = (grad.t().mm(codes) if needs[3] else None,
                         grad.sum(0) if needs[4] else None)  # fmt: skip
            grad = grad.mm(w_out)
        grad = grad.reshape(y.shape)
        kernel = torch.ops.aten.tanh_backward
        gy = kernel(grad, y) if graph_kept() else kernel.grad_input(grad, y, grad_input=y)
        gy = gy.mul_(slope)
        if ctx.a != 1.0:
            gy = gy.mul_(ctx.a)
        grad_zn = torch.ops.aten.native_batch_norm_backward(
            gy.view(z.shape), clamped, None, r_mean, r_var, mean, invstd,
            ctx.training, ctx.eps, [True, False, False],
        )[0]  # fmt: skip
        # the clamp's gradient, as autograd's: where -limit <= z <= limit (not at NaN)
        grad_z = torch.where(z.abs() <= ctx.limit, grad_zn, 0.0)
        if w_in is None:
            return grad_z, None, None, *grads_out, *(None,) * 5
        grad_x = grad_z.mm(w_in) if needs[0] else None
        grads_in = (grad_z.t().mm(x) if needs[1] else None, grad_z.sum(0) if needs[2] else None)
        return grad_x, *grads_in, *grads_out, *(None,) * 5
