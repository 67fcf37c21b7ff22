"""Gumbel-Softmax quantization (Jang et al. 2017; as in wav2vec 2.0 and DALL-E).

    logits = W x                                     (n, K)
    y      = softmax((logits + g) / tau),  g ~ Gumbel(0, 1)   in training
    y      = one_hot(argmax logits)                          in eval
    q      = y E                                     E: (K, dim) learned codes

``tau`` anneals exponentially with training progress ``p`` in [0, 1]:
``tau = tau_start^(1 - p) * tau_end^p`` (exactly ``tau_start`` at 0 and
``tau_end`` at 1). ``hard=True`` samples one-hot in training too, with
straight-through gradients. ``kl_weight`` adds ``KL(softmax(logits) || uniform)``,
which pushes towards using every code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stabq.errors import check, check_int, check_number
from stabq.quantizers.base import Quantizer


def annealed_tau(tau_start: float, tau_end: float, progress: float) -> float:
    """``tau_start^(1 - p) * tau_end^p``: exponential from ``tau_start`` to ``tau_end``."""
    return tau_start ** (1.0 - progress) * tau_end**progress


def kl_to_uniform(logits: Tensor) -> Tensor:
    """Mean over rows of ``KL(softmax(logits) || uniform) = sum p log p + log K``."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    log_p = F.log_softmax(logits, dim=-1)
    return (log_p.exp() * log_p).sum(-1).mean() + math.log(logits.shape[-1])


class GumbelQuantizer(Quantizer):
    """Learned logits over ``codebook_size`` codes, sampled by Gumbel-Softmax."""

    def __init__(
        self,
        dim: int,
        codebook_size: int = 32,
        tau_start: float = 5.0,
        tau_end: float = 0.1,
        hard: bool = False,
        kl_weight: float = 0.0,
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
        self.dim = dim
        self.codebook_size = codebook_size
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.hard = hard
        self.kl_weight = check_number(name, "kl_weight", kl_weight, 0)
        self.progress = 0.0
        self.to_logits = nn.Linear(dim, codebook_size)
        self.embed = nn.Parameter(torch.randn(codebook_size, dim))

    @property
    def tau(self) -> float:
        """The temperature at the current progress."""
        return annealed_tau(self.tau_start, self.tau_end, self.progress)

    def set_progress(self, progress: float) -> None:
        """Set training progress ``p`` in [0, 1], which sets ``tau``."""
        check(
            isinstance(progress, float | int) and 0.0 <= progress <= 1.0,
            f"GumbelQuantizer.set_progress: progress={progress!r}, allowed is a number in [0, 1]",
        )
        self.progress = float(progress)

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.to_logits(x).float()
        if self.training:
            weights = F.gumbel_softmax(logits, tau=self.tau, hard=self.hard)
            indices = weights.detach().argmax(-1)
        else:
            indices = logits.argmax(-1)
            weights = F.one_hot(indices, self.codebook_size).float()
        loss = self.kl_weight * kl_to_uniform(logits) if self.kl_weight else logits.new_zeros(())
        return weights.to(self.embed.dtype) @ self.embed, indices, loss

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(...,)`` to ``(..., dim)``: rows of the code table."""
        flat = self._check_indices(indices).to(self.embed.device)
        return self.embed[flat].reshape(*indices.shape, self.dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, tau={self.tau:.4g} "
            f"({self.tau_start} -> {self.tau_end}), hard={self.hard}, kl_weight={self.kl_weight}"
        )


__all__ = ["GumbelQuantizer", "annealed_tau"]
