"""ReinMax (Liu et al. 2023, "Bridging Discrete and Backpropagation: Straight-Through and
Beyond"): a second-order straight-through gradient for a one-hot sample.

For logits ``theta`` ``(n, K)``, a one-hot sample ``D`` of ``pi0 = softmax(theta)`` and a
temperature ``tau`` (the paper's Algorithm 2)::

    pi1 = (D + softmax(theta / tau)) / 2
    pi1 = softmax(sg(ln pi1 - theta) + theta)      value pi1, the softmax's gradient at pi1
    pi2 = 2 pi1 - pi0 / 2
    out = pi2 - sg(pi2) + D                        value exactly D

``sg`` stops the gradient. Backward, an upstream gradient ``g`` (a row) reaches ``theta``
as ``2 J(pi1) g - J(pi0) g / 2``, ``J(p) = diag(p) - p p^T`` the softmax Jacobian; each
row of it sums to 0. Straight-through is ``J(pi0) g`` alone: a first-order (Euler)
estimate of the gradient of ``E[f(D)]``, where ReinMax's is second-order (Heun): with
``tau = 1`` its expectation over ``D`` is the exact gradient whenever ``f`` is quadratic
in ``D``.

``2 J(pi1)`` is taken here through the linear ``pi1 * (theta - sum(pi1 * theta))`` with
``pi1`` held constant, whose Jacobian is ``J(pi1)``: the same gradient as the paper's
``softmax(sg(ln pi1 - theta) + theta)`` without its logarithm (``-inf`` where ``pi1``
underflows to 0) or a second softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reinmax(logits: Tensor, sample: Tensor, tau: float | Tensor) -> Tensor:
    """ReinMax straight-through output of a one-hot ``sample`` of ``softmax(logits)``.

    Forward returns ``sample`` exactly; backward sends an upstream gradient ``g`` to
    ``logits`` as ``2 J(pi1) g - J(pi0) g / 2``, ``pi0 = softmax(logits)``,
    ``pi1 = (sample + softmax(logits / tau)) / 2``, ``J(p) = diag(p) - p p^T`` (the
    paper's Algorithm 2; the module docstring gives it in full).

    Args:
        logits: unnormalised log-probabilities ``(..., K)``, floating point.
        sample: one-hot rows of the same shape, drawn from ``softmax(logits)`` (e.g.
            ``one_hot(argmax(logits + g))``, ``g`` Gumbel noise); no gradient flows to it.
        tau: the temperature of ``softmax(logits / tau)`` in ``pi1``, a number > 0 or a
            0-dim tensor.

    Returns:
        A tensor of ``logits``' shape and dtype, equal to ``sample``, differentiable with
        respect to ``logits``.

    Examples:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
        >>> out = reinmax(logits, torch.tensor([[0.0, 1.0, 0.0]]), tau=1.0)
        >>> out.tolist()
        [[0.0, 1.0, 0.0]]
        >>> out[0, 1].backward()
        >>> [round(v, 4) for v in logits.grad[0].tolist()]
        [-0.4219, 0.4429, -0.021]
    """
    sample = sample.detach().to(logits.dtype)
    pi0 = logits.softmax(-1)
    with torch.no_grad():
        pi1 = (logits / tau).softmax(-1).add_(sample).mul_(0.5)
    # Jacobian J(pi1) with pi1 held constant; the value cancels in the last line
    through_pi1 = pi1 * (logits - (pi1 * logits).sum(-1, keepdim=True))
    pi2 = 2.0 * through_pi1 - 0.5 * pi0
    return pi2 - pi2.detach() + sample


__all__ = ["reinmax"]
