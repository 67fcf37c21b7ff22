"""Codebook health: how many codes are used, and how evenly.

For code frequencies ``p_k = n_k / sum n`` of one codebook of ``K`` codes:

    usage        = |{k : n_k > 0}| / K
    entropy_bits = -sum_k p_k log2 p_k
    perplexity   = 2^entropy_bits       (1 when one code takes everything, K when uniform)
    dead_codes   = |{k : n_k = 0}|

Collapse shows as a perplexity near 1 and a usage near 1/K. With several
codebooks (RVQ layers, PQ subspaces) each is measured on its own; the top-level
figures are their means. An empty tally has usage and perplexity 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stabq import distributed
from stabq.errors import ShapeError, check, is_int


class CodebookUsage:
    """Running tally of code assignments: ``update(indices)``, then ``compute()``.

    ``indices`` are ``(...,)`` for one codebook or ``(..., num_codebooks)``;
    entries of -1 (quantization disabled) are ignored. Under torch.distributed
    ``compute()`` counts over all ranks, so every rank must call it (``sync=False``:
    this rank's counts alone).
    """

    def __init__(self, codebook_size: int, num_codebooks: int = 1, *, sync: bool = True) -> None:
        check(
            is_int(codebook_size) and codebook_size >= 1,
            f"CodebookUsage: codebook_size={codebook_size!r}, allowed is an integer >= 1",
        )
        check(
            is_int(num_codebooks) and num_codebooks >= 1,
            f"CodebookUsage: num_codebooks={num_codebooks!r}, allowed is an integer >= 1",
        )
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.sync = sync
        self.counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.long)

    @classmethod
    def for_quantizer(cls, quantizer) -> CodebookUsage:
        """A tally sized for ``quantizer`` (its ``codebook_size`` and ``num_codebooks``)."""
        return cls(max(1, quantizer.codebook_size), quantizer.num_codebooks)

    def reset(self) -> None:
        """Forget every count."""
        self.counts.zero_()

    def update(self, indices: Tensor) -> None:
        """Count the codes in ``indices``."""
        c, k = self.num_codebooks, self.codebook_size
        check(
            not indices.is_floating_point(),
            f"CodebookUsage.update: indices must be integers, found {indices.dtype}",
            ShapeError,
        )
        if c > 1:
            check(
                indices.dim() >= 1 and indices.shape[-1] == c,
                f"CodebookUsage.update: indices of shape {tuple(indices.shape)} must end in "
                f"num_codebooks={c}",
                ShapeError,
            )
        flat = indices.detach().reshape(-1, c).long().cpu()
        valid = flat >= 0
        if flat.numel() and int(flat.max()) >= k:
            raise ShapeError(
                f"CodebookUsage.update: index {int(flat.max())} out of range for codebook_size={k}"
            )
        offsets = torch.arange(c)[None, :] * k
        bins = torch.bincount((flat + offsets)[valid], minlength=c * k)
        self.counts += bins.view(c, k)

    def compute(self) -> dict:
        """``usage``, ``perplexity``, ``entropy_bits``, ``dead_codes`` (means over
        codebooks), ``samples`` and ``per_codebook`` (a list of the same per codebook)."""
        counts = self.counts.clone()
        if self.sync:
            distributed.all_reduce_sum_(counts)
        per = [_health(row) for row in counts]
        mean = {key: sum(p[key] for p in per) / len(per) for key in per[0]}
        return {**mean, "samples": int(counts[0].sum()), "per_codebook": per}


def _health(counts: Tensor) -> dict[str, float]:
    total = int(counts.sum())
    dead = int((counts == 0).sum())
    if total == 0:
        return {"usage": 0.0, "perplexity": 0.0, "entropy_bits": 0.0, "dead_codes": float(dead)}
    p = counts[counts > 0].double() / total
    entropy_bits = float(-(p * p.log2()).sum())
    return {
        "usage": (counts.numel() - dead) / counts.numel(),
        "perplexity": math.pow(2.0, entropy_bits),
        "entropy_bits": entropy_bits,
        "dead_codes": float(dead),
    }


__all__ = ["CodebookUsage"]
