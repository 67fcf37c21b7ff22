"""The Gumbel quantizer's training step from the logits to the mixed codes, in one autograd
Function per estimator, worked through a few rows at a time.

Each ``(n, K)`` pass of the plain form (noise, its two logarithms, the shift and the
division by ``tau``, the softmax, the argmax; backward the gradient to the mixture weights
and the softmax's Jacobian) runs on a block of about ``BLOCK_ELEMENTS`` entries while it
sits in cache, and no ``(n, K)`` buffer is made beyond the one the mixture keeps for
backward (the soft estimator) or the one gradient it returns (ReinMax). The values are
the plain form's: the same noise, drawn block after block from the same generator (on
CPU, where the blocks draw the same numbers as one draw; elsewhere one block of all rows),
through the same operations row by row.

ReinMax's sample is one-hot, so its mixture is a row lookup of the codes forward and an
index-add of the gradient backward: two matrix products of the plain form fewer.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from stabq.quantizers._graph import graph_kept
from stabq.quantizers.reinmax import reinmax_grad_into

BLOCK_ELEMENTS = 2**17  # entries of one block of rows: 512 KiB in float32, in cache


def blocks(n: int, k: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges ``(start, stop)`` covering ``n`` rows of ``k`` entries: one range where the
    generator's blocks would draw other numbers than one draw of all rows (not CPU)."""
    if device.type != "cpu":
        return [(0, n)] if n else []
    step = max(1, BLOCK_ELEMENTS // max(k, 1))
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def log_neg_log_(u: Tensor) -> Tensor:
    """``log(-log u)``, ``-g`` for ``g`` the Gumbel noise of ``u`` in [0, 1], with ``u``
    first clamped to ``[eps, 1 - eps]`` (``eps`` the dtype's machine epsilon); in place."""
    eps = torch.finfo(u.dtype).eps
    return u.clamp_(eps, 1.0 - eps).log_().neg_().log_()


def _draw(u: Tensor, generator: torch.Generator | None) -> Tensor:
    return u.uniform_() if generator is None else u.uniform_(generator=generator)


def noisy_argmax(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``argmax(logits + g)`` over the last dim of ``logits`` ``(..., K)``, ``g`` Gumbel noise
    drawn as ``gumbel_noise(logits, generator)`` would: int64 ``(..., 1)``."""
    k = logits.shape[-1]
    flat = logits.reshape(-1, k)
    n = flat.shape[0]
    index = torch.empty(n, 1, dtype=torch.long, device=logits.device)
    parts = blocks(n, k, logits.device)
    u = logits.new_empty(max((stop - start for start, stop in parts), default=0), k)
    with torch.no_grad():
        for start, stop in parts:
            shifted = log_neg_log_(_draw(u[: stop - start], generator))
            torch.sub(flat[start:stop], shifted, out=shifted)  # logits + g, exactly
            torch.argmax(shifted, -1, keepdim=True, out=index[start:stop])
    return index.reshape(*logits.shape[:-1], 1)


class _SoftMixture(torch.autograd.Function):
    """``(softmax((logits + g) / tau) @ embed, argmax of each row)``, ``g`` Gumbel noise."""

    @staticmethod
    def forward(ctx, logits: Tensor, embed: Tensor, tau, generator, reuse: bool):
        n, k = logits.shape
        ctx.set_materialize_grads(False)
        reuse = reuse and logits.is_contiguous()
        if reuse:  # the sample goes over the logits, returned as they now are (dirty)
            ctx.mark_dirty(logits)
        y = logits if reuse else torch.empty_like(logits, memory_format=torch.contiguous_format)
        indices = torch.empty(n, dtype=torch.long, device=logits.device)
        parts = blocks(n, k, logits.device)
        u = logits.new_empty(max((stop - start for start, stop in parts), default=0), k)
        for start, stop in parts:
            rows = y[start:stop]
            shifted = log_neg_log_(_draw(u[: stop - start], generator))
            torch.sub(logits[start:stop], shifted, out=rows).div_(tau)  # entry by entry
            torch.ops.aten._softmax.out(rows, -1, False, out=rows)  # row by row: in place
            torch.argmax(rows, -1, out=indices[start:stop])
        ctx.tau = tau
        ctx.save_for_backward(y, embed)
        ctx.mark_non_differentiable(indices)
        ctx.mark_non_differentiable(y)
        return y @ embed, indices, y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, _indices, _y):
        y, embed = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        grad = grad.contiguous()
        grad_embed = y.t().mm(grad) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, grad_embed, None, None, None
        # the gradient goes over y, block by block, unless the graph is used again
        into = torch.empty_like(y) if graph_kept() else y
        parts = blocks(*y.shape, y.device)
        buf = y.new_empty(max((stop - start for start, stop in parts), default=0), y.shape[1])
        for start, stop in parts:
            to_weights = torch.mm(grad[start:stop], embed.t(), out=buf[: stop - start])
            rows = into[start:stop]
            torch.ops.aten._softmax_backward_data.out(
                to_weights, y[start:stop], -1, y.dtype, grad_input=rows
            )
            rows.div_(ctx.tau)
        return into, grad_embed, None, None, None


class _ReinMaxMixture(torch.autograd.Function):
    """``embed[index]`` forward; ReinMax's gradient to ``logits`` and the codes' backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, embed: Tensor, index: Tensor, tau, reuse: bool):
        ctx.tau, ctx.reuse = tau, reuse
        ctx.save_for_backward(logits, embed, index)
        return embed.index_select(0, index[:, 0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        logits, embed, index = ctx.saved_tensors
        grad = grad.contiguous()
        grad_embed = None
        if ctx.needs_input_grad[1]:
            grad_embed = torch.zeros_like(embed).index_add_(0, index[:, 0], grad)
        if not ctx.needs_input_grad[0]:
            return None, grad_embed, None, None, None
        # the gradient goes over the logits, block by block, where no one reads them again
        reuse = ctx.reuse and not graph_kept() and logits.is_contiguous()
        out = logits if reuse else torch.empty_like(logits, memory_format=torch.contiguous_format)
        parts = blocks(*logits.shape, logits.device)
        most = max((stop - start for start, stop in parts), default=0)
        to_sample, pi1 = (logits.new_empty(most, logits.shape[1]) for _ in range(2))
        for start, stop in parts:
            rows = slice(start, stop)
            torch.mm(grad[rows], embed.t(), out=to_sample[: stop - start])
            reinmax_grad_into(
                to_sample[: stop - start], logits[rows], index[rows], ctx.tau,
                pi1[: stop - start], out[rows],
            )  # fmt: skip
        return out, grad_embed, None, None, None


def soft_mixture(
    logits: Tensor,
    embed: Tensor,
    tau: float | Tensor,
    generator: torch.Generator | None = None,
    reuse: bool = False,
) -> tuple[Tensor, Tensor]:
    """``softmax((logits + g) / tau) @ embed`` and each row's argmax, ``g`` Gumbel noise.

    ``logits`` ``(n, K)`` and ``embed`` ``(K, d)`` of one floating dtype; returns the mixed
    codes ``(n, d)`` and int64 ``(n,)``. Once differentiable. ``reuse``: the sample and
    then its gradient are written over ``logits`` (only for a caller that never reads
    them again).
    """
    quantized, indices, _ = _SoftMixture.apply(logits, embed, tau, generator, reuse)
    return quantized, indices


def reinmax_mixture(
    logits: Tensor,
    embed: Tensor,
    tau: float | Tensor,
    generator: torch.Generator | None = None,
    reuse: bool = False,
) -> tuple[Tensor, Tensor]:
    """The code of ``argmax(logits + g)`` for each row, ``g`` Gumbel noise, with ReinMax's
    gradient to ``logits`` (``reinmax_at``'s) and the one-hot mixture's to ``embed``.

    Returns the codes ``(n, d)`` and int64 ``(n,)``. Once differentiable. ``reuse``: the
    gradient is written over ``logits`` (only for a caller that never reads them again).
    """
    index = noisy_argmax(logits.detach(), generator)
    return _ReinMaxMixture.apply(logits, embed, index, tau, reuse), index[:, 0]
