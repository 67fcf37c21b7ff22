"""``tokens``: a generated token-id task whose class is the ORDER of its tokens.

A mnist1d for sequences, generated locally (nothing is downloaded): 4,000 train and
1,000 test sequences of token ids, 16 to 32 tokens long, padded with ``PAD_ID`` to
``MAX_LEN``. Every sequence holds the three marker roles ``A``, ``B`` and ``C`` exactly
once each, at random positions among random filler tokens; its class is the order in
which the roles appear (``"ACB"``: A first, then C, then B), one of six.

What makes it a test of order, and not of words:

- A bag of tokens carries no information about the class: each role appears exactly once
  whatever the class, and the filler, the lengths and the synonym of each role (below)
  are drawn independently of it, so the token counts have the same distribution in every
  class and a model that sees only counts scores chance (1/6).
- Each role is written with one of ``SYNONYMS`` ids drawn at random per sequence (role A
  is id 1, 2 or 3, ...), so the order is an order of meanings: a model must learn that
  several ids play one part, as an embedding does.
- ``LABEL_NOISE`` of the labels are redrawn uniformly at random (train and test alike),
  so even a perfect reader of order scores about ``1 - LABEL_NOISE * 5/6`` (0.917), as
  real labels are never clean.
"""

from __future__ import annotations

import itertools

import numpy as np

VOCAB_SIZE = 64  # ids 0..63: the pad, the marker ids, then the filler ids
MAX_LEN = 32
MIN_LEN = 16
PAD_ID = 0
ROLES = "ABC"
SYNONYMS = 3  # ids per marker role
MARKER_IDS: tuple[tuple[int, ...], ...] = tuple(
    tuple(range(1 + r * SYNONYMS, 1 + (r + 1) * SYNONYMS)) for r in range(len(ROLES))
)  # ((1, 2, 3), (4, 5, 6), (7, 8, 9))
FIRST_FILLER = 1 + len(ROLES) * SYNONYMS  # 10: filler ids are 10..VOCAB_SIZE-1
TOKEN_CLASSES: list[str] = ["".join(p) for p in itertools.permutations(ROLES)]
NUM_CLASSES = len(TOKEN_CLASSES)  # 6
_ORDERS = np.array(list(itertools.permutations(range(len(ROLES)))), dtype=np.int64)
TOKEN_TRAIN, TOKEN_TEST = 4000, 1000
LABEL_NOISE = 0.1


def _sequences(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` padded sequences and their true (noise-free) classes, balanced."""
    k = len(ROLES)
    y = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=n)
    x = rng.integers(FIRST_FILLER, VOCAB_SIZE, size=(n, MAX_LEN), dtype=np.int64)
    inside = np.arange(MAX_LEN)[None, :] < lengths[:, None]
    x[~inside] = PAD_ID
    # k distinct positions, uniform among each row's real tokens, in increasing order
    keys = np.where(inside, rng.random((n, MAX_LEN)), np.inf)
    slots = np.sort(np.argsort(keys, axis=1, kind="stable")[:, :k], axis=1)
    # the class's order puts role _ORDERS[y, j] at the j-th slot, as one of its synonyms
    roles = _ORDERS[y]
    ids = 1 + roles * SYNONYMS + rng.integers(0, SYNONYMS, size=(n, k))
    np.put_along_axis(x, slots, ids, axis=1)
    return x, y


def token_arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``tokens`` task: ``(x, y, x_test, y_test)``, token ids and their classes.

    Deterministic for a seed; numpy's global RNG is left as found (the generator is
    ``np.random.default_rng(seed)``).

    Args:
        seed: the seed of the sequences, their lengths, synonyms, order and label noise.

    Returns:
        ``x`` (``TOKEN_TRAIN x MAX_LEN``) and ``x_test`` (``TOKEN_TEST x MAX_LEN``), int64
        token ids: real tokens in ``1..VOCAB_SIZE-1``, then ``PAD_ID`` to the end of each
        row; ``y`` and ``y_test``, int64 classes in ``0..NUM_CLASSES-1``, indices into
        ``TOKEN_CLASSES`` (the order of the marker roles), ``LABEL_NOISE`` of them redrawn
        at random.

    Examples:
        >>> from stabq.data.tokens import TOKEN_CLASSES, token_arrays, token_lengths
        >>> x, y, x_test, y_test = token_arrays(seed=0)
        >>> x.shape, x.dtype, y.shape, x_test.shape
        ((4000, 32), dtype('int64'), (4000,), (1000, 32))
        >>> bool(token_lengths(x).min() >= 16), len(TOKEN_CLASSES)
        (True, 6)
    """
    rng = np.random.default_rng(seed)
    n = TOKEN_TRAIN + TOKEN_TEST
    x, y = _sequences(rng, n)
    noisy = rng.random(n) < LABEL_NOISE
    y[noisy] = rng.integers(0, NUM_CLASSES, size=int(noisy.sum()))
    cut = TOKEN_TRAIN
    return (x[:cut], y[:cut], x[cut:], y[cut:])


def token_lengths(x: np.ndarray) -> np.ndarray:
    """Each row's length: the number of positions before its first ``PAD_ID``.

    Args:
        x: token ids, ``(N, L)``; a row without a pad has length ``L``.

    Returns:
        The lengths, int64 ``(N,)``.

    Raises:
        ValueError: ``x`` is not 2-D.

    Examples:
        >>> import numpy as np
        >>> from stabq.data.tokens import token_lengths
        >>> token_lengths(np.array([[5, 7, 0, 0], [3, 4, 5, 6]])).tolist()
        [2, 4]
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"token ids must be 2-D (sequences x positions), found shape {x.shape}")
    pad = x == PAD_ID
    return np.where(pad.any(axis=1), pad.argmax(axis=1), x.shape[1]).astype(np.int64)
