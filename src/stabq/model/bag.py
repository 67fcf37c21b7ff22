"""The bag-of-tokens encoder: the mean of a sequence's token embeddings, padding left out,
then an MLP. It sees which tokens occur and how often, never their order: the baseline
that shows how much of a task the order of its tokens carries."""

from __future__ import annotations

from torch import Tensor, nn

from stabq.errors import check, is_int


class TokenBag(nn.Module):
    """Token ids ``(N, L)`` -> features ``(N, out_dim)``, blind to order.

    Args:
        vocab_size: ids run over ``[0, vocab_size)``.
        out_dim: features out.
        d_model: size of a token's embedding (default 64).
        hidden: width of the MLP's hidden layer (default 128).
        dropout: dropout after the hidden layer, in [0, 1).
        pad_id: the id that pads a sequence after its end; it is left out of the mean.

    Raises:
        ConfigError: a size that is not a positive integer, or ``pad_id`` outside the
            vocabulary.

    Examples:
        >>> import torch
        >>> from stabq.model.bag import TokenBag
        >>> bag = TokenBag(10, 4)
        >>> x = torch.tensor([[3, 1, 2, 0, 0], [2, 3, 1, 0, 0]])  # the same tokens, reordered
        >>> torch.allclose(bag(x)[0], bag(x)[1])
        True
    """

    def __init__(
        self,
        vocab_size: int,
        out_dim: int,
        *,
        d_model: int = 64,
        hidden: int = 128,
        dropout: float = 0.0,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("out_dim", out_dim),
                            ("d_model", d_model), ("hidden", hidden)):  # fmt: skip
            check(is_int(value) and value >= 1, f"{name}={value!r}, allowed is an integer >= 1")
        check(is_int(pad_id) and 0 <= pad_id < vocab_size,
              f"pad_id={pad_id!r}, allowed is an id in [0, vocab_size={vocab_size})")  # fmt: skip
        self.pad_id = int(pad_id)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(N, out_dim)`` of token ids ``x`` ``(N, L)``; a row of padding alone
        has the features of an empty bag (a zero mean)."""
        keep = (x != self.pad_id).unsqueeze(-1).to(self.embed.weight.dtype)
        total = (self.embed(x) * keep).sum(1)
        return self.mlp(total / keep.sum(1).clamp(min=1.0))


__all__ = ["TokenBag"]
