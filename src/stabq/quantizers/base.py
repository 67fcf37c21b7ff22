"""The interface every quantizer shares.

A quantizer maps ``x`` of shape ``(..., dim)`` to a :class:`QuantizerOutput`.
The base class flattens the leading dims, casts half-precision input to the
module's own float dtype (codebooks and projections stay float32), and handles
the continuous pass-through used by the first stage of two-stage training.
Subclasses implement only ``_quantize`` on a 2-D ``(n, dim)`` tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from stabq.errors import ShapeError, check
from stabq.quantizers.codebook import Codebook


class QuantizerOutput(NamedTuple):
    """What every quantizer returns.

    quantized: ``(..., dim)``, straight-through (soft for Gumbel in training).
    indices:   ``(...,)`` int64, or ``(..., num_codebooks)`` for RVQ and PQ;
               -1 where quantization is disabled.
    loss:      0-dim auxiliary loss (commitment etc.); zero where there is none.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class Quantizer(nn.Module):
    """Base class: shape and dtype handling, pass-through, the shared attributes.

    Attributes every subclass sets: ``dim`` (input and output feature size),
    ``codebook_size`` (codes per codebook), ``num_codebooks``.
    ``grid`` (class attribute, default False) is True where the codes are the
    cells of a fixed grid (FSQ, and LFQ/BSQ-like quantizers): nothing is learned
    per code, so an unvisited cell is not a dead code (:mod:`stabq.health`).
    ``quantization_enabled`` (default True) switches to a continuous
    pass-through that returns ``x`` unchanged and indices of -1.

    Any float dtype and leading shape is accepted, an empty batch (a 0 among
    the leading dims) too: it gives empty ``quantized`` and ``indices`` and a
    zero loss. Anything else (not a float tensor, a last dim other than
    ``dim``) is a :class:`ShapeError`.
    """

    dim: int
    codebook_size: int
    num_codebooks: int = 1
    multi_codebook: bool = False  # indices keep a trailing codebook axis (RVQ, PQ), even of 1
    grid: bool = False  # codes are cells of a fixed grid (FSQ): none is learned, none dies

    def __init__(self) -> None:
        super().__init__()
        self.quantization_enabled = True

    @property
    def indices_shape(self) -> tuple[int, ...]:
        """Trailing shape of one row's indices: ``()`` or ``(num_codebooks,)``."""
        return (self.num_codebooks,) if self.multi_codebook else ()

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the math runs in: the module's float dtype, else float32 or float64."""
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        for t in self.buffers():
            if t.is_floating_point():
                return t.dtype
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def forward(self, x: Tensor) -> QuantizerOutput:
        name = type(self).__name__
        if not isinstance(x, Tensor) or not x.is_floating_point():
            found = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{name}: input must be a floating-point tensor, found {found}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ShapeError(
                f"{name}: input of shape {tuple(x.shape)} has last dimension "
                f"{x.shape[-1] if x.dim() else 'none'}, expected dim={self.dim}"
            )
        lead = x.shape[:-1]
        if not self.quantization_enabled:
            indices = torch.full(
                (*lead, *self.indices_shape), -1, dtype=torch.long, device=x.device
            )
            return QuantizerOutput(x, indices, x.new_zeros((), dtype=torch.float32))
        flat = x.reshape(-1, self.dim).to(self.compute_dtype(x))
        quantized, indices, loss = self._quantize(flat)
        return QuantizerOutput(
            quantized.to(x.dtype).reshape(x.shape),
            indices.reshape(*lead, *self.indices_shape),
            loss,
        )

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize ``x`` of shape ``(n, dim)``: ``(quantized, indices, loss)``."""
        raise NotImplementedError

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1], for quantizers with a schedule (Gumbel's tau)."""

    @torch.no_grad()
    def init_from_features(self, x: Tensor) -> None:
        """Re-initialise every codebook by k-means on features ``x`` ``(n, dim)``.

        Used between the stages of two-stage training. Codebooks are seeded on
        what they see in one training-mode pass (each RVQ layer on its own
        residuals); quantizers without a codebook only update running statistics.
        """
        for module in self.modules():
            if isinstance(module, Codebook):
                module.initted.fill_(False)
        was_training, was_enabled = self.training, self.quantization_enabled
        self.train()
        self.quantization_enabled = True
        try:
            self(x)
        finally:
            self.train(was_training)
            self.quantization_enabled = was_enabled

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Decode indices ``(...,)`` or ``(..., num_codebooks)`` to ``(..., dim)``."""
        raise NotImplementedError

    def _check_indices(self, indices: Tensor) -> Tensor:
        """Validate decoding input; return it flattened to ``(n, *indices_shape)``."""
        name = type(self).__name__
        tail = self.indices_shape
        check(
            not indices.is_floating_point() and not indices.is_complex(),
            f"{name}.indices_to_codes: indices must be integers, found {indices.dtype}",
            ShapeError,
        )
        check(
            tuple(indices.shape[indices.dim() - len(tail) :]) == tail,
            f"{name}.indices_to_codes: indices of shape {tuple(indices.shape)} must end in {tail}",
            ShapeError,
        )
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            check(
                lo >= 0 and hi < self.codebook_size,
                f"{name}.indices_to_codes: indices range over [{lo}, {hi}], "
                f"allowed is [0, {self.codebook_size - 1}]",
                ShapeError,
            )
        return indices.reshape(-1, *tail).long()


class Identity(Quantizer):
    """The continuous reference (preset ``none``): passes ``x`` through, indices -1."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        check(
            isinstance(dim, int) and dim >= 1, f"Identity: dim={dim!r}, allowed is an integer >= 1"
        )
        self.dim = dim
        self.codebook_size = 0

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        indices = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        return x, indices, x.new_zeros((), dtype=torch.float32)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        raise ShapeError("Identity (preset 'none') has no codes to decode")
