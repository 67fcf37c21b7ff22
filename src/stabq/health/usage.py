"""Codebook health: how many codes are used, and how evenly. One definition, used by every
figure stabq shows (training progress, ``metrics.jsonl``, ``stabq evaluate``, the
comparison, the report, TensorBoard, the Lightning and monitor figures).

For the code counts ``n_k`` of one codebook of ``K`` codes over a tally of ``N`` inputs
(``p_k = n_k / N``):

    codes_used   = |{k : n_k > 0}|
    usage        = codes_used / K                 share of all codes seen
    fill         = codes_used / min(K, N)         share of what N inputs can reach
                                                  (0 for no inputs)
    entropy_bits = -sum_k p_k log2 p_k
    perplexity   = 2^entropy_bits                 (1 when one code takes everything,
                                                  K when uniform; 0 for no inputs)
    dead_codes   = K - codes_used                 codes of a learned codebook that no
                                                  input reached; None for a grid

``fill`` is the figure to judge usage by: 1,000 inputs can show at most 1,000 of
FSQ's 64,000 cells, so its ``usage`` is at most 0.016 on them while its ``fill`` can
reach 1. A grid (FSQ, LFQ, BSQ, residual FSQ: ``quantizer.grid``) learns no codes, so
none can die: an unvisited cell costs nothing, and ``dead_codes`` is None.

Collapse shows as a perplexity near 1 and a fill near 1/min(K, N). With several
codebooks (RVQ layers, PQ subspaces) each is measured on its own; the top-level
figures are their means.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stabq import distributed
from stabq.errors import ShapeError, check, is_int


class CodebookUsage:
    """Count which codes a quantizer uses, and say how many and how evenly.

    One definition behind every health figure stabq shows (training progress,
    `metrics.jsonl`, `stabq evaluate`, the comparison, TensorBoard, the Lightning
    callbacks, `CollapseMonitor`). For one codebook of `K` codes whose counts over `N`
    inputs are `n_k` (`p_k = n_k / N`):

    - `codes_used` = the codes with `n_k > 0`; `usage` = `codes_used / K`;
    - `fill` = `codes_used / min(K, N)` (0 for no inputs), the share of what `N`
      inputs can reach: the figure to judge usage by (1,000 inputs can show at most
      1,000 of FSQ's 64,000 cells, so its `usage` is at most 0.016 on them while its
      `fill` can reach 1);
    - `entropy_bits` = `-sum p_k log2 p_k`; `perplexity` = `2^entropy_bits` (1 when one
      code takes everything, `K` when uniform, 0 for no inputs);
    - `dead_codes` = `K - codes_used` for a learned codebook; None for a grid (FSQ,
      LFQ, residual FSQ), whose cells are not learned and cannot die.

    Collapse shows as a perplexity near 1 and a fill near `1 / min(K, N)`. With several
    codebooks (RVQ layers, PQ subspaces) each is measured on its own; the top-level
    figures are their means.

    Args:
        codebook_size: codes per codebook `K`, an integer >= 1.
        num_codebooks: codebooks; indices then end in an axis of this size.
        sync: under torch.distributed, `compute` counts over all ranks, so every rank
            must call it; False: this rank's counts alone.
        grid: the codes are cells of a fixed grid: `dead_codes` is None
            (`for_quantizer` sets it from the quantizer).

    Raises:
        ConfigError: `codebook_size` or `num_codebooks` is not an integer >= 1.

    Examples:
        >>> import torch, stabq
        >>> usage = stabq.CodebookUsage(codebook_size=4)
        >>> usage.update(torch.tensor([0, 0, 1, 1]))
        >>> figures = usage.compute()
        >>> figures["fill"], figures["perplexity"], figures["dead_codes"]
        (0.5, 2.0, 2.0)
    """

    def __init__(
        self, codebook_size: int, num_codebooks: int = 1, *, sync: bool = True, grid: bool = False
    ) -> None:
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
        self.grid = bool(grid)
        self.counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.long)

    @classmethod
    def for_quantizer(cls, quantizer) -> CodebookUsage:
        """A tally sized for a quantizer: its `codebook_size`, `num_codebooks` and `grid`.

        Args:
            quantizer (Quantizer): a stabq quantizer (or a module with those attributes).
        """
        grid = bool(getattr(quantizer, "grid", False))
        return cls(max(1, quantizer.codebook_size), quantizer.num_codebooks, grid=grid)

    def reset(self) -> None:
        """Forget every count."""
        self.counts.zero_()

    def update(self, indices: Tensor) -> None:
        """Count the codes in `indices`; entries of -1 (quantization off) are left out.

        Args:
            indices: integer `(...,)`, or `(..., num_codebooks)` with several codebooks.

        Raises:
            ShapeError: float indices, a trailing axis other than `num_codebooks`, or an
                index >= `codebook_size`.
        """
        self.counts += count_codes(indices, self.codebook_size, self.num_codebooks).cpu()

    def compute(self) -> dict:
        """The figures, means over codebooks.

        Returns:
            A dict: `usage`, `fill`, `codes_used`, `perplexity`, `entropy_bits`,
                `dead_codes` (None for a grid), `samples` (`N`), `fillable`
                (`min(K, N)`), `grid`, and `per_codebook` (a list of each codebook's
                figures).
        """
        counts = self.counts.clone()
        if self.sync:
            distributed.all_reduce_sum_(counts)
        return usage_figures(counts, grid=self.grid)


def count_codes(
    indices: Tensor, codebook_size: int, num_codebooks: int = 1, owner: str = "CodebookUsage"
) -> Tensor:
    """How often each code occurs in ``indices``: ``(num_codebooks, codebook_size)`` int64 on
    ``indices``' device; entries of -1 (quantization off) are left out.

    Raises :class:`ShapeError` for float indices, a trailing axis other than
    ``num_codebooks`` (when there are several) or an index >= ``codebook_size``, its
    message naming ``owner``'s ``update``.
    """
    c, k = num_codebooks, codebook_size
    check(
        not indices.is_floating_point(),
        f"{owner}.update: indices must be integers, found {indices.dtype}",
        ShapeError,
    )
    if c > 1:
        check(
            indices.dim() >= 1 and indices.shape[-1] == c,
            f"{owner}.update: indices of shape {tuple(indices.shape)} must end in "
            f"num_codebooks={c}",
            ShapeError,
        )
    flat = indices.detach().reshape(-1, c).long()
    if flat.numel() and int(flat.max()) >= k:
        raise ShapeError(
            f"{owner}.update: index {int(flat.max())} out of range for codebook_size={k}"
        )
    offsets = torch.arange(c, device=flat.device)[None, :] * k
    bins = torch.bincount((flat + offsets)[flat >= 0], minlength=c * k)
    return bins.view(c, k)


def usage_figures(counts: Tensor, *, grid: bool = False) -> dict:
    """:meth:`CodebookUsage.compute`'s figures from code counts ``(C, K)``: the means over
    codebooks, ``samples``, ``fillable``, ``grid`` and ``per_codebook``."""
    counts = counts.cpu()
    per = [codebook_figures(row, grid=grid) for row in counts]
    mean = {key: _mean([p[key] for p in per]) for key in per[0]}
    samples = int(counts[0].sum())
    return {
        **mean,
        "samples": samples,
        "fillable": min(counts.shape[1], samples),
        "grid": grid,
        "per_codebook": per,
    }


def _mean(values: list) -> float | None:
    return None if values[0] is None else sum(values) / len(values)


def codebook_figures(counts: Tensor, *, grid: bool = False) -> dict[str, float | None]:
    """The figures of one codebook from its code counts ``(K,)`` (see the module docstring).

    Example::

        codebook_figures(torch.tensor([3, 1, 0, 0]))["perplexity"]  # 1.755...
    """
    total, size = int(counts.sum()), counts.numel()
    seen = counts[counts > 0]  # one pass over the codebook for the codes used
    used = seen.numel()
    fillable = min(size, total)
    figures: dict[str, float | None] = {
        "usage": used / size,
        "fill": used / fillable if fillable else 0.0,
        "codes_used": float(used),
        "perplexity": 0.0,
        "entropy_bits": 0.0,
        "dead_codes": None if grid else float(size - used),
    }
    if total:
        p = seen.double() / total
        figures["entropy_bits"] = float(-(p * p.log2()).sum())
        figures["perplexity"] = math.pow(2.0, figures["entropy_bits"])
    return figures


__all__ = ["CodebookUsage", "codebook_figures", "count_codes", "usage_figures"]
