"""Gumbel-Softmax quantization (Jang et al. 2017; as in wav2vec 2.0 and DALL-E).

    logits = W x                                     (n, K)
    y      = softmax((logits + g) / tau),  g ~ Gumbel(0, 1)   in training
    y      = one_hot(argmax logits)                          in eval
    q      = y E                                     E: (K, dim) learned codes

``tau`` anneals exponentially with training progress ``p`` in [0, 1]:
``tau = tau_start^(1 - p) * tau_end^p`` (exactly ``tau_start`` at 0 and
``tau_end`` at 1). ``p`` is what ``set_progress(p)`` last set (stabq's trainer
calls it every step), else, with ``anneal_steps=N``, ``min(1, s / N)`` for ``s``
the quantizer's own count of training steps (training-mode forwards that
quantize, with gradients on), kept in the ``anneal_step`` buffer, saved and
loaded with the weights. Without either, ``tau`` stays at ``tau_start``.
``hard=True`` samples one-hot in training too, with straight-through gradients.
``estimator="reinmax"`` samples one-hot ``D = one_hot(argmax(logits + g))`` (a draw of
``softmax(logits)``) with ReinMax's second-order gradient (Liu et al. 2023,
:mod:`stabq.quantizers.reinmax`), ``tau`` then the temperature of its
``softmax(logits / tau)`` only.
``kl_weight`` adds ``KL(softmax(logits) || uniform)``, which pushes towards
using every code.

Two options keep the codes in use when the logits barely train (SGD at 1e-2, where
without them the test inputs reached 3 to 8 of the 32 codes; see the changelog),
both on in the ``gumbel`` preset:

- ``pre_norm=True`` standardises each input dimension over the batch first
  (BatchNorm without affine, running statistics at eval, every rank's rows in
  distributed training) and draws ``W ~ N(0, 1/dim)``, ``b = 0``: the logits start
  with unit variance, not drowned by the Gumbel noise (std 1.28).
- ``diversity_weight`` adds wav2vec 2.0's diversity loss
  ``w (K - exp H(pbar)) / K``, ``pbar`` the batch mean of ``softmax(logits)``
  (over every rank's rows in distributed training): 0 when the batch uses every
  code evenly, near ``w`` when it uses one.

The noise is ``g = -log(-log u)``, ``u ~ U[0, 1)`` clamped to ``[eps, 1 - eps]``
(``eps`` the dtype's machine epsilon): the inverse of the Gumbel CDF
``exp(-exp(-g))``, about three times faster on CPU than ``F.gumbel_softmax``'s
``-log(Exp(1))`` (PyTorch's ``exponential_``). The clamp bounds ``g`` to about
[-2.8, 15.9] in float32, a tail mass near 1e-7 on either side, and keeps it finite.

In eager training the step from the logits to the mixed codes is one autograd Function
(:mod:`stabq.quantizers.gumbel_fused`), worked a block of rows at a time: the same noise
and values as the formulas above, without their extra ``(n, K)`` tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stabq import distributed
from stabq.errors import check, check_int, check_number
from stabq.quantizers._graph import compiling, graph_kept
from stabq.quantizers.base import Quantizer
from stabq.quantizers.fsq import pre_normalise
from stabq.quantizers.gumbel_fused import log_neg_log_, noisy_argmax, reinmax_mixture, soft_mixture
from stabq.quantizers.reinmax import reinmax, reinmax_at

ESTIMATORS = ("softmax", "reinmax")


def annealed_tau(tau_start: float, tau_end: float, progress: float) -> float:
    """``tau_start^(1 - p) * tau_end^p``: exponential from ``tau_start`` to ``tau_end``."""
    return tau_start ** (1.0 - progress) * tau_end**progress


def gumbel_from_uniform(u: Tensor) -> Tensor:
    """``-log(-log u)`` of ``u`` in [0, 1] (any shape), with ``u`` first clamped in
    place to ``[eps, 1 - eps]``, ``eps = finfo(u.dtype).eps``: finite even at 0 and 1.

    The inverse of the Gumbel CDF ``exp(-exp(-g))``, so ``u ~ U[0, 1)`` gives
    ``g ~ Gumbel(0, 1)``. Overwrites and returns ``u``.
    """
    return log_neg_log_(u).neg_()


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel(0, 1) noise, a fresh tensor of ``like``'s shape, dtype and device."""
    if generator is None:  # rand_like: torch.compile traces it for a batch size it varies
        u = torch.rand_like(like, memory_format=torch.contiguous_format)
    else:
        u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return gumbel_from_uniform(u)


class _NoisySoftmax(torch.autograd.Function):
    """``y = softmax((logits + g) / tau)`` over the last dim, ``g = gumbel_noise(logits)``.

    Forward works in place on the noise's buffer (no other ``(n, K)`` tensor is made);
    backward is ``(y * (grad - sum(grad * y))) / tau``, computed into ``y``'s buffer when
    ``reuse`` and the graph is not kept (only a caller that never reads ``y`` after backward
    may ask), else into a fresh one. Each fresh ``(16384, 1024)`` float32 buffer cost
    15 to 30 ms in page faults on the measuring machine; the values are bit for bit autograd's.
    """

    @staticmethod
    def forward(ctx, logits, tau: float | Tensor, generator, reuse: bool):
        y = gumbel_noise(logits, generator).add_(logits).div_(tau)
        torch.ops.aten._softmax.out(y, -1, False, out=y)  # row by row: in place is safe
        ctx.tau, ctx.reuse = tau, reuse
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        if ctx.reuse and not graph_kept():
            into = torch.ops.aten._softmax_backward_data.out
            grad_h = into(grad, y, -1, y.dtype, grad_input=y)
        else:
            grad_h = torch._softmax_backward_data(grad, y, -1, y.dtype)
        return grad_h.div_(ctx.tau), None, None, None


def gumbel_reinmax(
    logits: Tensor, tau: float | Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """One-hot Gumbel-max sample over the last dim of ``logits`` ``(n, K)``, shape ``(n, K)``,
    with ReinMax's gradient (``stabq.quantizers.reinmax.reinmax``).

    The sample is ``one_hot(argmax(logits + g))``, ``g = gumbel_noise(logits)``: a draw of
    ``softmax(logits)``, whatever ``tau``; ``tau`` enters the gradient only.
    """
    if not compiling():
        return reinmax_at(logits, noisy_argmax(logits.detach(), generator), tau)
    with torch.no_grad():
        index = gumbel_noise(logits, generator).add_(logits).argmax(-1, keepdim=True)
    sample = torch.zeros_like(logits, memory_format=torch.contiguous_format)
    return reinmax(logits, sample.scatter_(-1, index, 1.0), tau)  # plain ops when compiled


def _sample(logits: Tensor, tau: float | Tensor, hard: bool, generator, reuse: bool) -> Tensor:
    if compiling():  # plain operations: the in-place tricks stay eager
        y = (gumbel_noise(logits, generator) + logits).div(tau).softmax(-1)
    else:
        y = _NoisySoftmax.apply(logits, tau, generator, reuse)
    if not hard:
        return y
    index = y.detach().argmax(-1, keepdim=True)
    y_hard = torch.zeros_like(y, memory_format=torch.contiguous_format).scatter_(-1, index, 1.0)
    return y_hard - y.detach() + y


def gumbel_softmax(
    logits: Tensor, tau: float, hard: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Gumbel-Softmax sample over the last dim of ``logits`` ``(n, K)``, shape ``(n, K)``.

    ``y = softmax((logits + g) / tau)``, ``g = gumbel_noise(logits)``. ``hard=True``
    returns ``one_hot(argmax y)`` forward and ``y``'s gradient backward
    (straight-through: ``y_hard - y.detach() + y``), as ``F.gumbel_softmax`` does.
    """
    return _sample(logits, tau, hard, generator, reuse=False)


def kl_to_uniform(logits: Tensor) -> Tensor:
    """Mean over rows of ``KL(softmax(logits) || uniform) = sum p log p + log K``."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    log_p = F.log_softmax(logits, dim=-1)
    return (log_p.exp() * log_p).sum(-1).mean() + math.log(logits.shape[-1])


def diversity_loss(logits: Tensor, sync: bool = False) -> Tensor:
    """``(K - exp H(pbar)) / K``, at least 0, for ``logits`` ``(n, K)``, ``pbar = mean_n
    softmax(logits)``, ``H`` the entropy in nats; 0 for no rows. ``sync``: ``pbar`` over
    every rank's rows (one differentiable all-reduce, which every rank must enter, rows or
    none)."""
    k = logits.shape[-1]
    sums, rows = distributed.sum_rows_over_ranks(logits.softmax(-1).sum(0), logits.shape[0], sync)
    if rows == 0:
        return logits.new_zeros(()) + 0.0 * sums.sum()  # keeps the graph on every rank
    pbar = sums / rows
    entropy = -(pbar * pbar.clamp_min(torch.finfo(pbar.dtype).tiny).log()).sum()
    return (k - entropy.exp()).clamp_min(0.0) / k  # exp H rounds above K at even use


class GumbelQuantizer(Quantizer):
    """Gumbel-Softmax quantization (Jang et al. 2017): learned logits over learned codes.

    In training the output is `softmax((logits + g) / tau) @ codes` with Gumbel noise
    `g` (with `estimator="reinmax"`, the code of `argmax(logits + g)`); in eval the code
    of the largest logit. `tau` anneals exponentially from
    `tau_start` to `tau_end` with training progress `p`:
    `tau = tau_start^(1 - p) * tau_end^p`. `stabq.train` sets `p` every step
    (`set_progress`); a loop of your own calls `set_progress` or passes `anneal_steps`.

    Args:
        dim: input size, an integer >= 1.
        codebook_size: number of codes `K`, an integer >= 1.
        tau_start: the temperature at progress 0, a finite number > 0.
        tau_end: the temperature at progress 1, a finite number > 0.
        hard: sample one-hot in training too, with straight-through gradients.
        kl_weight: weight of `KL(softmax(logits) || uniform)`, which pushes towards
            using every code (a number >= 0).
        pre_norm: standardise each input dimension over the batch first (BatchNorm
            without affine; every rank's rows in distributed training) and start the
            logits at unit variance, so the Gumbel noise does not drown them.
        diversity_weight: weight `w` of wav2vec 2.0's diversity loss
            `w (K - exp H(pbar)) / K`, `pbar` the batch mean of `softmax(logits)`: 0
            when the batch uses every code evenly, near `w` when it uses one (>= 0).
        anneal_steps: anneal `tau` over this many training steps of the quantizer's own
            count, for a loop that never calls `set_progress` (an integer >= 1; default
            None: `tau` moves only by `set_progress`). A `set_progress` call takes over
            from the count for good; the count is saved with the weights.
        estimator: the training gradient: `"softmax"` (the Gumbel-Softmax above, `hard`
            as set) or `"reinmax"` (a one-hot Gumbel-max sample forward, whatever `hard`
            says, and ReinMax's second-order straight-through gradient backward, `tau`
            the temperature of its `softmax(logits / tau)`; Liu et al. 2023).

    Raises:
        ConfigError: an option outside the range given above.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.GumbelQuantizer(16, 32, anneal_steps=1000)  # 5.0 -> 0.1 in 1000 steps
        >>> out = q(torch.randn(8, 16))
        >>> out.indices.shape, round(q.tau, 3)
        (torch.Size([8]), 4.98)
        >>> q.set_progress(1.0)
        >>> q.tau
        0.1
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 32,
        tau_start: float = 5.0,
        tau_end: float = 0.1,
        hard: bool = False,
        kl_weight: float = 0.0,
        pre_norm: bool = False,
        diversity_weight: float = 0.0,
        anneal_steps: int | None = None,
        estimator: str = "softmax",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_int(name, "dim", dim, 1)
        check_int(name, "codebook_size", codebook_size, 1)
        for arg, value in (("tau_start", tau_start), ("tau_end", tau_end)):
            check(
                isinstance(value, float | int) and value > 0 and math.isfinite(value),
                f"{name}: {arg}={value!r}, allowed is a finite number > 0",
            )
        check(
            estimator in ESTIMATORS,
            f"{name}: estimator={estimator!r}, allowed is one of {', '.join(ESTIMATORS)}",
        )
        self.estimator = estimator
        self.dim = dim
        self.codebook_size = codebook_size
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.hard = hard
        self.kl_weight = check_number(name, "kl_weight", kl_weight, 0)
        self.diversity_weight = check_number(name, "diversity_weight", diversity_weight, 0)
        self.progress = 0.0
        self.progress_set = False  # a set_progress call takes over from the step count
        self.anneal_steps = anneal_steps
        if anneal_steps is not None:  # persistent: a resumed run goes on where it stopped
            check_int(name, "anneal_steps", anneal_steps, 1)
            self.register_buffer("anneal_step", torch.zeros((), dtype=torch.long))
        self.to_logits = nn.Linear(dim, codebook_size)
        self.embed = nn.Parameter(torch.randn(codebook_size, dim))
        self.pre_norm = nn.BatchNorm1d(dim, affine=False) if pre_norm else None
        if pre_norm:  # unit-variance logits for standardised inputs
            nn.init.normal_(self.to_logits.weight, std=dim**-0.5)
            nn.init.zeros_(self.to_logits.bias)

    @property
    def counting(self) -> bool:
        """True while ``tau`` follows the quantizer's own step count (``anneal_steps``)."""
        return self.anneal_steps is not None and not self.progress_set

    @property
    def tau(self) -> float:
        """The temperature at the current progress (the next training forward's)."""
        if self.counting:
            progress = min(1.0, int(self.anneal_step) / self.anneal_steps)
            return annealed_tau(self.tau_start, self.tau_end, progress)
        return annealed_tau(self.tau_start, self.tau_end, self.progress)

    def set_progress(self, progress: float) -> None:
        """Set training progress `p`, which sets `tau` (from now on, whatever
        `anneal_steps` says).

        Args:
            progress: a number in [0, 1].

        Raises:
            ConfigError: `progress` is not a number in [0, 1].
        """
        check(
            isinstance(progress, float | int) and 0.0 <= progress <= 1.0,
            f"GumbelQuantizer.set_progress: progress={progress!r}, allowed is a number in [0, 1]",
        )
        self.progress, self.progress_set = float(progress), True

    def _counted_tau(self) -> Tensor:
        """This training forward's ``tau`` by the step count, a 0-dim tensor (no device sync,
        nothing for torch.compile to guard); counts the step when gradients are on."""
        step = self.anneal_step
        dtype = torch.float32 if step.device.type == "mps" else torch.float64  # mps: no float64
        p = (step.to(dtype) / self.anneal_steps).clamp(max=1.0)
        tau = self.tau_start ** (1.0 - p) * self.tau_end**p
        if torch.is_grad_enabled():
            step.add_(1)
        return tau

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        """A state dict without ``anneal_step`` (saved without ``anneal_steps``) loads with the
        count at 0; one with it loads into a quantizer without ``anneal_steps`` (eval, say)."""
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        key = prefix + "anneal_step"
        if key in missing_keys:
            missing_keys.remove(key)
            self.anneal_step.zero_()
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.to_logits(pre_normalise(self.pre_norm, x)).float()
        if self.training:
            tau = self._counted_tau() if self.counting else self.tau
            quantized, indices = self._mix(logits, tau)
        else:
            indices = logits.argmax(-1)
            weights = F.one_hot(indices, self.codebook_size).float()
            quantized = weights.to(self.embed.dtype) @ self.embed
        loss = self.kl_weight * kl_to_uniform(logits) if self.kl_weight else logits.new_zeros(())
        if self.diversity_weight and self.training:  # the same on every rank
            sync = distributed.is_distributed()
            loss = loss + self.diversity_weight * diversity_loss(logits, sync)
        return quantized, indices, loss

    def _mix(self, logits: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor]:
        """The training sample's mixture of codes ``(n, dim)`` and its indices ``(n,)``: in one
        autograd Function where it can (``gumbel_fused``), else in plain operations."""
        fused = not compiling() and logits.dtype == self.embed.dtype and logits.dim() == 2
        reuse = not self.kl_weight and not self.diversity_weight  # no loss reads the logits
        if fused and self.estimator == "reinmax":
            return reinmax_mixture(logits, self.embed, tau, reuse=reuse)
        if fused and not self.hard:
            return soft_mixture(logits, self.embed, tau, reuse=reuse)
        if self.estimator == "reinmax":
            weights = gumbel_reinmax(logits, tau)
        else:  # the weights feed only the product below, done with them in backward
            weights = _sample(logits, tau, self.hard, None, reuse=True)
        return weights.to(self.embed.dtype) @ self.embed, weights.detach().argmax(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(...,)`` to ``(..., dim)``: rows of the code table."""
        flat = self._check_indices(indices).to(self.embed.device)
        return self.embed[flat].reshape(*indices.shape, self.dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, tau={self.tau:.4g} "
            f"({self.tau_start} -> {self.tau_end}), hard={self.hard}, kl_weight={self.kl_weight}, "
            f"pre_norm={self.pre_norm is not None}, diversity_weight={self.diversity_weight}"
            + ("" if self.anneal_steps is None else f", anneal_steps={self.anneal_steps}")
            + ("" if self.estimator == "softmax" else f", estimator={self.estimator!r}")
        )


__all__ = [
    "GumbelQuantizer",
    "annealed_tau",
    "diversity_loss",
    "gumbel_from_uniform",
    "gumbel_noise",
    "gumbel_reinmax",
    "gumbel_softmax",
]
