"""Codebook usage as a `torchmetrics.Metric`: :class:`CodebookUsageMetric`.

The same figures as :class:`stabq.CodebookUsage` (one definition: :mod:`stabq.health.usage`),
kept as a torchmetrics state, so that torchmetrics reduces the counts over processes
(``dist_reduce_fx="sum"``) and Lightning's ``self.log`` and ``MetricCollection`` take it
as any other metric. Needs the ``torchmetrics`` package (``pip install
'stabq[torchmetrics]'``; Lightning installs it too).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from stabq.errors import check, is_int
from stabq.health.usage import count_codes, usage_figures


class CodebookUsageMetric(Metric):
    """Codebook usage, perplexity, dead codes and fill as a `torchmetrics.Metric`.

    `update(indices)` counts codes as `stabq.CodebookUsage.update` does (entries of -1 left
    out); `compute()` returns `stabq.CodebookUsage.compute`'s dict, its figures equal to
    the last digit, over the counts of every process (torchmetrics sums the state when
    torch.distributed is initialised).

    Args:
        codebook_size: codes per codebook `K`, an integer >= 1.
        num_codebooks: codebooks; indices then end in an axis of this size.
        grid: the codes are cells of a fixed grid: `dead_codes` is None.
        **kwargs (Any): options of `torchmetrics.Metric` (`sync_on_compute`, ...).

    Raises:
        ConfigError: `codebook_size` or `num_codebooks` is not an integer >= 1.

    Examples:
        >>> import torch, stabq
        >>> from stabq.integrations.torchmetrics import CodebookUsageMetric
        >>> metric = CodebookUsageMetric(codebook_size=4)
        >>> metric.update(torch.tensor([0, 0, 1, 1]))
        >>> figures = metric.compute()
        >>> figures["fill"], figures["perplexity"], figures["dead_codes"]
        (0.5, 2.0, 2.0)
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self, codebook_size: int, num_codebooks: int = 1, *, grid: bool = False, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("codebook_size", codebook_size), ("num_codebooks", num_codebooks)):
            check(
                is_int(value) and value >= 1,
                f"CodebookUsageMetric: {name}={value!r}, allowed is an integer >= 1",
            )
        self.codebook_size, self.num_codebooks, self.grid = codebook_size, num_codebooks, grid
        zeros = torch.zeros(num_codebooks, codebook_size, dtype=torch.long)
        self.add_state("counts", default=zeros, dist_reduce_fx="sum")

    @classmethod
    def for_quantizer(cls, quantizer, **kwargs) -> CodebookUsageMetric:
        """A metric sized for a quantizer: its `codebook_size`, `num_codebooks` and `grid`.

        Args:
            quantizer (Quantizer): a stabq quantizer (or a module with those attributes).
            **kwargs (Any): options of `torchmetrics.Metric`.

        Returns:
            A new `CodebookUsageMetric`.
        """
        grid = bool(getattr(quantizer, "grid", False))
        size = max(1, quantizer.codebook_size)
        return cls(size, quantizer.num_codebooks, grid=grid, **kwargs)

    def update(self, indices: Tensor) -> None:
        """Count the codes in `indices`.

        Args:
            indices: integer `(...,)`, or `(..., num_codebooks)` with several codebooks.

        Raises:
            ShapeError: float indices, a trailing axis other than `num_codebooks`, or an
                index >= `codebook_size`.
        """
        counts = count_codes(indices, self.codebook_size, self.num_codebooks, type(self).__name__)
        self.counts += counts.to(self.counts.device)

    def compute(self) -> dict:
        """The figures over every process's counts.

        Returns:
            `stabq.CodebookUsage.compute`'s dict: `usage`, `fill`, `codes_used`,
                `perplexity`, `entropy_bits`, `dead_codes` (None for a grid), `samples`,
                `fillable`, `grid`, `per_codebook`.
        """
        return usage_figures(self.counts, grid=self.grid)


__all__ = ["CodebookUsageMetric"]
