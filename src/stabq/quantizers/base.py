"""The interface every quantizer shares.

A quantizer maps ``x`` of shape ``(..., dim)`` to a :class:`QuantizerOutput`.
The base class flattens the leading dims, casts half-precision input to the
module's own float dtype (codebooks and projections stay float32; autocast is off
inside the quantizer's math, so distances are float32 too), and handles
the continuous pass-through used by the first stage of two-stage training.
Subclasses implement only ``_quantize`` on a 2-D ``(n, dim)`` tensor.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor, nn

from stabq.errors import ShapeError, check
from stabq.quantizers.codebook import Codebook

AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")  # others ("meta") have no autocast to ask


def _full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside the quantizer's math (a no-op when autocast is not on)."""
    if device_type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class QuantizerOutput(NamedTuple):
    """What every quantizer's forward returns: a named tuple `(quantized, indices, loss)`.

    Attributes:
        quantized: `(..., dim)`, the input's shape and dtype: the codes, with the
            gradient passed on to the input (straight through, or by the rotation
            trick; Gumbel's soft mixture of codes in training); the input itself where
            quantization is off.
        indices: `(...,)` int64, or `(..., num_codebooks)` for a quantizer with several
            codebooks (`ResidualVQ`, `ProductQuantizer`, `ResidualFSQ`, `LFQ` with
            `num_codebooks > 1`); -1 where quantization is off (always for `Identity`).
        loss: 0-dim float32 auxiliary loss (commitment, entropy, diversity, ...) to add
            to the task loss; 0 where the quantizer has none.

    Examples:
        >>> import torch, stabq
        >>> out = stabq.build_quantizer("pq", 64)(torch.randn(10, 3, 64))
        >>> out.quantized.shape, out.indices.shape, out.loss.shape
        (torch.Size([10, 3, 64]), torch.Size([10, 3, 8]), torch.Size([]))
        >>> quantized, indices, loss = out  # a tuple too
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class Quantizer(nn.Module):
    """The interface every stabq quantizer shares (an `nn.Module`; build one by preset).

    `quantizer(x)` maps `x (..., dim)` of any float dtype and leading shape to a
    `QuantizerOutput`; an empty batch (a 0 among the leading dims) gives empty
    `quantized` and `indices` and a zero loss. The math runs in the module's own float
    dtype (codebooks and projections stay float32 under half-precision input) and the
    result comes back in the input's. Subclasses implement `_quantize` on `(n, dim)`.

    Attributes:
        dim: the input and output feature size.
        codebook_size: codes per codebook (0 for `Identity`).
        num_codebooks: codebooks (layers, subspaces) per row; 1 for most quantizers.
        multi_codebook: True where `indices` keep a trailing axis of `num_codebooks`
            (`ResidualVQ`, `ProductQuantizer`, `ResidualFSQ`, even of 1).
        grid: True where the codes are the cells of a fixed grid (`FSQ`, `ResidualFSQ`,
            `LFQ`): nothing is learned per code, so an unvisited cell is no dead code.
        quantization_enabled: True by default; False makes the forward a continuous
            pass-through that returns `x` unchanged and indices of -1 (the first stage
            of two-stage training).

    Examples:
        >>> import torch, stabq
        >>> q = stabq.build_quantizer("vq", 16)
        >>> isinstance(q, stabq.Quantizer), q.dim, q.codebook_size, q.num_codebooks
        (True, 16, 512, 1)
        >>> q.quantization_enabled = False
        >>> q(torch.randn(4, 16)).indices
        tensor([-1, -1, -1, -1])
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
        """The dtype the math runs in: the module's float dtype, else float32 or float64.

        Args:
            x: the input; its dtype decides only for a module without float tensors
                (float64 for float64 input, else float32).
        """
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        for t in self.buffers():
            if t.is_floating_point():
                return t.dtype
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def forward(self, x: Tensor) -> QuantizerOutput:
        """Quantize `x`.

        Args:
            x: `(..., dim)`, any floating-point dtype.

        Returns:
            `QuantizerOutput(quantized (..., dim), indices (...,) or (..., num_codebooks)
                int64, loss 0-dim)`.

        Raises:
            ShapeError: `x` is not a floating-point tensor, or its last dimension is not
                `dim`.
        """
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
        # a 2-D input is taken as it is: a reshape to its own shape would add an autograd node
        flat = x if x.dim() == 2 else x.reshape(-1, self.dim)
        flat = flat.to(self.compute_dtype(x))
        with _full_precision(flat.device.type):  # autocast would halve the distances
            quantized, indices, loss = self._quantize(flat)
        quantized = quantized.to(x.dtype)
        return QuantizerOutput(
            quantized if quantized.shape == x.shape else quantized.reshape(x.shape),
            indices.reshape(*lead, *self.indices_shape),
            loss,
        )

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize ``x`` of shape ``(n, dim)``: ``(quantized, indices, loss)``."""
        raise NotImplementedError

    def set_progress(self, progress: float) -> None:
        """Tell the quantizer how far training is; only a schedule uses it (Gumbel's tau).

        Args:
            progress: the share of training done, in [0, 1]; `stabq.train` calls this
                every step.
        """

    @torch.no_grad()
    def init_from_features(self, x: Tensor) -> None:
        """Re-initialise every codebook by k-means on features `x`.

        Used between the stages of two-stage training. Codebooks are seeded on
        what they see in one training-mode pass (each RVQ layer on its own
        residuals); quantizers without a codebook only update running statistics.

        Args:
            x: features `(n, dim)`, e.g. the encoder's output on training rows.
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
        """Decode stored indices back to the quantized features.

        Args:
            indices: integer `(...,)`, or `(..., num_codebooks)` for a quantizer with
                several codebooks, each in `[0, codebook_size)`.

        Returns:
            `(..., dim)` in the module's float dtype: what the forward's `quantized` was.

        Raises:
            ShapeError: indices that are not integers, of the wrong trailing shape, or
                out of range; `Identity` has no codes to decode.
        """
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
    """The continuous reference (preset `none`): passes `x` through, indices -1, loss 0.

    Args:
        dim: the feature size, an integer >= 1.

    Raises:
        ConfigError: `dim` is not an integer >= 1.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.Identity(4)
        >>> x = torch.randn(2, 4)
        >>> out = q(x)
        >>> torch.equal(out.quantized, x), out.indices, float(out.loss)
        (True, tensor([-1, -1]), 0.0)
    """

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
