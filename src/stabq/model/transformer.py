"""A small transformer encoder over token ids whose output does not depend on padding.

``TokenTransformer`` maps token ids ``(N, L)`` to features ``(N, out_dim)``: token and
learned position embeddings, pre-norm transformer layers, a final LayerNorm, the mean over
the positions that are not padding, and a linear map. A row's output is bitwise the same
however much padding follows it, on every CPU kernel path (see the class docstring).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stabq.errors import ShapeError, check, check_int, is_int

OWNER = "TokenTransformer"
ID_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_sizes(
    vocab_size: object,
    max_len: object,
    out_dim: object,
    d_model: object,
    heads: object,
    layers: object,
    ff: object,
    dropout: object,
    pad_id: object,
) -> None:
    """Each size is an integer in its range, else a ConfigError naming it."""
    check_int(OWNER, "vocab_size", vocab_size, 2)  # the pad id and at least one token
    check_int(OWNER, "max_len", max_len, 1)
    check_int(OWNER, "out_dim", out_dim, 1)
    check_int(OWNER, "d_model", d_model, 1)
    check_int(OWNER, "heads", heads, 1)
    check(
        d_model % heads == 0,  # type: ignore[operator]
        f"{OWNER}: d_model={d_model} with heads={heads}, allowed is a multiple of heads",
    )
    check_int(OWNER, "layers", layers, 0)
    if ff is not None:
        check_int(OWNER, "ff", ff, 1)
    check(
        isinstance(dropout, float | int) and not isinstance(dropout, bool) and 0 <= dropout < 1,
        f"{OWNER}: dropout={dropout!r}, allowed is a number 0 <= dropout < 1",
    )
    check(
        is_int(pad_id) and 0 <= pad_id < vocab_size,  # type: ignore[operator]
        f"{OWNER}: pad_id={pad_id!r}, allowed is an integer 0 <= pad_id < vocab_size={vocab_size}",
    )


def check_ids(x: object, vocab_size: int, max_len: int) -> None:
    """Refuse anything but a 2-D integer tensor of ids in ``[0, vocab_size)``, ``L <= max_len``.

    Args:
        x: the input to check, expected a tensor ``(N, L)`` of token ids.
        vocab_size: ids must be below it.
        max_len: the longest ``L`` allowed.

    Raises:
        ShapeError: ``x`` is not a tensor, not 2-D, not of an integer dtype, longer than
            ``max_len``, or holds an id ``< 0`` or ``>= vocab_size``; the message is one line
            and names the row and position of the first bad id (in row-major order).

    Examples:
        >>> import torch
        >>> from stabq.errors import ShapeError
        >>> from stabq.model.transformer import check_ids
        >>> try:
        ...     check_ids(torch.tensor([[1, 2], [3, 9]]), vocab_size=5, max_len=4)
        ... except ShapeError as err:
        ...     print(err)
        TokenTransformer: row 1, position 1: id 9, allowed is 0 <= id < 5 (vocab_size)
    """
    if not isinstance(x, Tensor):
        raise ShapeError(f"{OWNER}: input is a {type(x).__name__}, expected a tensor (N, L) of ids")
    shape = "(" + ", ".join(map(str, x.shape)) + ")"
    check(x.dim() == 2, f"{OWNER}: input of shape {shape}, expected (N, L) token ids", ShapeError)
    check(
        x.dtype in ID_DTYPES,
        f"{OWNER}: input of dtype {x.dtype}, expected integer token ids (torch.int64)",
        ShapeError,
    )
    check(
        x.shape[1] <= max_len,
        f"{OWNER}: input of shape {shape} is longer than max_len={max_len}, allowed is "
        f"(N, L) with L <= {max_len}",
        ShapeError,
    )
    bad = ((x < 0) | (x >= vocab_size)).flatten().nonzero()
    if bad.numel():
        row, position = divmod(int(bad[0]), x.shape[1])
        raise ShapeError(
            f"{OWNER}: row {row}, position {position}: id {int(x[row, position])}, allowed is "
            f"0 <= id < {vocab_size} (vocab_size)"
        )


def content_length(x: Tensor, pad_id: int) -> int:
    """The length that keeps every id of the batch that is not ``pad_id``.

    Positions after it are padding in every row: cutting them off changes no row's output,
    and makes the layers see the same tensor however much padding the batch carried.

    Args:
        x: token ids ``(N, L)``.
        pad_id: the padding id.

    Returns:
        One more than the last position where some row holds a non-pad id; 0 when every
        id is ``pad_id`` (or the batch is empty).

    Examples:
        >>> import torch
        >>> from stabq.model.transformer import content_length
        >>> content_length(torch.tensor([[4, 0, 0, 0], [5, 0, 6, 0]]), pad_id=0)
        3
        >>> content_length(torch.zeros(2, 7, dtype=torch.long), pad_id=0)
        0
    """
    used = (x != pad_id).any(dim=0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 0


class TokenTransformer(nn.Module):
    """A small transformer encoder: token ids ``(N, L)`` to features ``(N, out_dim)``.

    Token and learned position embeddings are summed, then go through ``layers`` pre-norm
    transformer layers (``nn.TransformerEncoderLayer``, GELU, ``norm_first=True``) and a
    final LayerNorm; the features are the mean over the positions whose id is not
    ``pad_id``, mapped by a linear layer to ``out_dim``.

    Padding (``pad_id``) is masked as attention keys and left out of the mean, and its
    embedding is replaced by zeros before the layers, so the pad id's embedding weights
    never reach the output. A row made only of padding is an empty sequence: its features
    are zeros before the final linear layer, so its output is that layer's bias (finite:
    the positions of such a row attend to each other, never to no key at all).

    Mean pooling rather than a class token: it needs no extra position (all ``max_len``
    positions hold tokens), it is free of padding by construction (pads are left out of
    the mean rather than attended away), and it reads any length the same way, down to
    the empty sequence.

    Exact padding invariance: a row's output is bitwise identical however much padding
    follows it (a row alone, or a batch whose other rows are the same). Attention kernels
    and reductions over different lengths may round differently, so padding never reaches
    them: each batch is first cut to its longest non-pad length (:func:`content_length`),
    after which the layers see the same tensor whatever padding came with it. This holds
    in training and evaluation, with or without gradients, on every CPU kernel path
    (``ATEN_CPU_CAPABILITY``), and even with dropout, given the same random state. A row's
    output may differ in the last bits when its batch mates change (the layers then run on
    other shapes), and in evaluation under ``torch.no_grad()`` (torch's fused path for the
    layers) from evaluation with gradients.

    Args:
        vocab_size: number of token ids, ``pad_id`` included (at least 2).
        max_len: the longest input length ``L`` (positions learned).
        out_dim: number of output features.
        d_model: width of the embeddings and of the layers; ``heads`` must divide it.
        heads: attention heads per layer.
        layers: transformer layers (0 gives the mean of the normalised embeddings).
        ff: hidden width of each layer's feed-forward block; None means ``2 * d_model``.
        dropout: dropout of the layers, ``0 <= dropout < 1``.
        pad_id: the padding id, ``0 <= pad_id < vocab_size``.

    Raises:
        ConfigError: a size is not an integer in its range (``vocab_size >= 2``,
            ``max_len, out_dim, d_model, heads >= 1``, ``layers >= 0``, ``ff >= 1``),
            ``heads`` does not divide ``d_model``, or ``dropout``/``pad_id`` is out of range.

    Examples:
        >>> import torch
        >>> from stabq.model.transformer import TokenTransformer
        >>> _ = torch.manual_seed(0)
        >>> model = TokenTransformer(vocab_size=100, max_len=16, out_dim=8).eval()
        >>> x = torch.tensor([[5, 7, 9, 0], [3, 0, 0, 0]])
        >>> model(x).shape
        torch.Size([2, 8])
        >>> padded = torch.nn.functional.pad(x, (0, 12))  # to max_len
        >>> torch.equal(model(x), model(padded))
        True
        >>> torch.equal(model(torch.zeros(1, 4, dtype=torch.long))[0], model.out.bias)
        True
        >>> from stabq.errors import ConfigError
        >>> try:
        ...     TokenTransformer(100, 16, 8, d_model=30)
        ... except ConfigError as err:
        ...     print(err)
        TokenTransformer: d_model=30 with heads=4, allowed is a multiple of heads
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        out_dim: int,
        *,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int | None = None,
        dropout: float = 0.1,
        pad_id: int = 0,
    ) -> None:
        _check_sizes(vocab_size, max_len, out_dim, d_model, heads, layers, ff, dropout, pad_id)
        super().__init__()
        self.vocab_size, self.max_len, self.out_dim = vocab_size, max_len, out_dim
        self.d_model, self.pad_id = d_model, pad_id
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.positions = nn.Embedding(max_len, d_model)
        width = 2 * d_model if ff is None else ff
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, heads, width, dropout, "gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Features of each row of token ids.

        Args:
            x: token ids ``(N, L)``, ``L <= max_len``, of an integer dtype, each in
                ``[0, vocab_size)``; ``pad_id`` marks padding, anywhere in a row.

        Returns:
            Features ``(N, out_dim)``, float32 (the parameters' dtype); a row of padding
            only (or ``L = 0``) gives ``out.bias``.

        Raises:
            ShapeError: ``x`` is not a 2-D integer tensor, is longer than ``max_len``, or
                holds an id outside ``[0, vocab_size)`` (the message names the row and
                position of the first); checked before any embedding lookup.

        Examples:
            >>> import torch
            >>> from stabq.model.transformer import TokenTransformer
            >>> model = TokenTransformer(vocab_size=10, max_len=6, out_dim=3)
            >>> model(torch.tensor([[1, 2, 3, 0]])).shape
            torch.Size([1, 3])
            >>> from stabq.errors import ShapeError
            >>> try:
            ...     model(torch.tensor([[1, 2, 3], [4, -1, 0]]))
            ... except ShapeError as err:
            ...     print(err)
            TokenTransformer: row 1, position 1: id -1, allowed is 0 <= id < 10 (vocab_size)
        """
        check_ids(x, self.vocab_size, self.max_len)
        length = content_length(x, self.pad_id)
        if length == 0:  # nothing but padding: the features of an empty sequence
            return self.out(self.norm.weight.new_zeros(x.shape[0], self.d_model))
        return self.features_of(x[:, :length].long())

    def features_of(self, ids: Tensor) -> Tensor:
        """The features of checked token ids `(n, L)`, over all `L` positions.

        Padding is zeroed before and after the layers, masked as attention keys and left
        out of the mean; a row of padding only gives `out.bias`.

        Args:
            ids: `(n, L)` int64 token ids, `L <= max_len`, already checked.

        Returns:
            `(n, out_dim)` features.
        """
        length = ids.shape[1]
        pad = ids == self.pad_id
        h = self.tokens(ids).masked_fill(pad.unsqueeze(-1), 0.0) + self.positions.weight[:length]
        # a row of padding only attends to its own positions, left out of the mean anyway:
        # all keys masked gives NaN on torch < 2.5 (0 from 2.5 on, pytorch/pytorch#131060)
        keys = pad & ~pad.all(dim=1, keepdim=True)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=keys)
        h = self.norm(h).masked_fill(pad.unsqueeze(-1), 0.0)
        count = (~pad).sum(dim=1, keepdim=True).clamp(min=1)
        return self.out(h.sum(dim=1) / count)


__all__ = ["TokenTransformer", "check_ids", "content_length"]
