"""How sure is a difference: method A against method B, paired over seeds and test rows.

A comparison trains every method with the same seeds and tests every run on the same
rows, so two methods can be compared pair by pair. With ``n`` shared seeds, ``N`` test
rows and ``c_A,s,i`` = 1 when A's run of seed ``s`` classifies test row ``i`` correctly:

    d_s      = acc_A,s - acc_B,s                  the difference on seed s
    D        = mean_s d_s                         the paired difference (the figure shown)
    delta_i  = mean_s (c_A,s,i - c_B,s,i)         the difference on row i, over the seeds

Two sources of uncertainty add up:

    training randomness   v_seed = s_d^2 / n      s_d the sample sd of d_s (n - 1 dof);
                                                  absent with one seed
    the test rows         v_rows = var_i(delta_i) / N   sample variance over the rows
                                                  (N - 1 dof); the same rows serve every
                                                  seed, so more seeds do not shrink it

    SE^2 = v_seed + v_rows
    df   = SE^4 / (v_seed^2 / (n - 1) + v_rows^2 / (N - 1))      (Welch-Satterthwaite)
    95% interval = D ± t_{0.975, df} * SE

With 2 seeds and a seed part that dominates, ``df`` is near 1 and ``t`` near 12.7: the
interval is wide. That is honest: two seeds say little about how far a third would
land. The two methods **cannot be told apart** when the interval contains 0 (its ends
included): two methods with the same predictions on every row give D = 0, SE = 0 and the
interval [0, 0], which cannot tell them apart either.

:func:`seeds_to_separate` estimates how many seeds in all would separate them: the
smallest ``n`` above the seeds run (up to 50) at which
``t_{0.975, df(n)} * sqrt(s_d^2 / n + v_rows)`` falls under ``|D|``, with the spread
between seeds and the row part as measured (``df(n)`` as above, the seed part on
``n - 1`` dof). It is None with one seed (no spread known), and when even 50 seeds would
not do; :func:`rows_decide` says whether the test rows alone are too few (more test rows,
not more seeds, would be needed).

Which rows a run got right travel in its record as ``test_correct``, a numpy bool array;
``results.json`` stores it packed, 8 rows a byte, base64 (:func:`pack_correct`), so a
million test rows cost 167 kB a run.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

LEVEL = 0.95  # the interval's coverage
MOST_SEEDS = 50  # seeds_to_separate looks no further


@dataclass(frozen=True)
class PairedDifference:
    """Method A minus method B, paired over shared seeds and test rows (module docstring).

    Attributes:
        difference: D, the mean over seeds of the accuracy differences (a fraction).
        low, high: the 95% interval of D.
        seeds: n, the seeds both methods ran.
        rows: N, the test rows.
        seed_sd: s_d, the sample sd of the per-seed differences (None with one seed).
        row_var: var_i(delta_i), the sample variance over rows of the per-row
            differences averaged over seeds (None with one row).
        df: the Welch-Satterthwaite degrees of freedom (inf when SE is 0).
    """

    difference: float
    low: float
    high: float
    seeds: int
    rows: int
    seed_sd: float | None
    row_var: float | None
    df: float

    @property
    def cannot_tell(self) -> bool:
        """Whether the interval contains 0 (its ends included)."""
        return self.low <= 0.0 <= self.high


def half_width(
    seed_sd: float | None, seeds: int, row_var: float | None, rows: int, level: float = LEVEL
) -> tuple[float, float]:
    """The interval's half-width ``t_{(1+level)/2, df} * SE`` and ``df``.

    Args:
        seed_sd: s_d over ``seeds`` seeds, or None (one seed: the part is absent).
        seeds: n.
        row_var: var_i(delta_i) over ``rows`` rows, or None (the part is absent).
        rows: N.
        level: the coverage.
    Returns:
        ``(half_width, df)``; ``(0.0, inf)`` when both parts are 0, ``(inf, nan)`` when
        both are absent (nothing is known of the uncertainty).

    Example::

        half, df = half_width(0.01, 3, 0.2, 1000)   # about (0.0303, 91.4)
    """
    parts = []
    if seed_sd is not None and seeds > 1:
        parts.append((seed_sd**2 / seeds, seeds - 1))
    if row_var is not None and rows > 1:
        parts.append((row_var / rows, rows - 1))
    if not parts:
        return math.inf, math.nan
    se2 = sum(v for v, _ in parts)
    if se2 == 0.0:
        return 0.0, math.inf
    df = se2**2 / sum(v**2 / dof for v, dof in parts)
    return float(stats.t.ppf((1 + level) / 2, df)) * math.sqrt(se2), df


def paired_difference(correct_a: ArrayLike, correct_b: ArrayLike) -> PairedDifference:
    """The paired difference of A against B and its 95% interval (module docstring).

    Args:
        correct_a: ``(n, N)``: per shared seed (the same order for both), per test row,
            whether A's run got the row right (bool or 0/1). A 1-D array is one seed.
        correct_b: the same for B.
    Returns:
        A :class:`PairedDifference`.
    Raises:
        ValueError: the shapes differ, or there is no seed or no row.

    Example::

        a = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=bool)
        b = np.array([[1, 0, 0, 1], [0, 0, 1, 1]], dtype=bool)
        pair = paired_difference(a, b)   # D = 0.25, interval about [-0.209, 0.709], df 3
        pair.cannot_tell                 # True
    """
    a, b = np.atleast_2d(np.asarray(correct_a)), np.atleast_2d(np.asarray(correct_b))
    if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"paired_difference: shapes {a.shape} and {b.shape}, need (n, N) alike")
    diff = a.astype(np.float64) - b.astype(np.float64)
    seeds, rows = diff.shape
    per_seed, per_row = diff.mean(axis=1), diff.mean(axis=0)
    seed_sd = float(per_seed.std(ddof=1)) if seeds > 1 else None
    row_var = float(per_row.var(ddof=1)) if rows > 1 else None
    d = float(per_seed.mean())
    half, df = half_width(seed_sd, seeds, row_var, rows)
    return PairedDifference(d, d - half, d + half, seeds, rows, seed_sd, row_var, df)


def seeds_to_separate(pair: PairedDifference, most: int = MOST_SEEDS) -> int | None:
    """How many seeds in all would separate A from B, with the same s_d and row part.

    Args:
        pair: the measured difference.
        most: the most seeds to consider.
    Returns:
        For a pair the interval cannot tell apart, the smallest ``n`` above its seeds (up to
        ``most``) whose interval would exclude 0; for a pair already separated, the smallest
        ``n`` from 2 that would have done (at most its own seeds). None with one seed (no
        spread known), for D = 0, or when even ``most`` seeds would not do (see
        :func:`rows_decide`).

    Example::

        rng = np.random.default_rng(0)
        a, b = rng.random((3, 1000)) < 0.75, rng.random((3, 1000)) < 0.70
        seeds_to_separate(paired_difference(a, b))   # 3: D = 0.046, interval [0.005, 0.086]
    """
    d = abs(pair.difference)
    if pair.seed_sd is None or not d > 0.0 or not math.isfinite(d):
        return None
    for n in range(pair.seeds + 1 if pair.cannot_tell else 2, most + 1):
        if half_width(pair.seed_sd, n, pair.row_var, pair.rows)[0] < d:
            return n
    return None


def rows_decide(pair: PairedDifference) -> bool:
    """Whether the test rows alone leave the interval around 0, however many seeds: the
    row part's own half-width ``t_{0.975, N-1} * sqrt(var_i(delta_i) / N)`` is at least
    ``|D|``. Then more test rows, not more seeds, would be needed to separate A from B.

    Example::

        rows_decide(paired_difference(a, b))   # True: 4 test rows are too few for 0.25
    """
    half = half_width(None, pair.seeds, pair.row_var, pair.rows)[0]
    return half >= abs(pair.difference)


def pack_correct(correct: ArrayLike) -> str:
    """A bool array as text: 8 rows a byte (``numpy.packbits``), base64.

    Example::

        unpack_correct(pack_correct([True, False, True]), 3)   # array([ True, False,  True])
    """
    bits = np.packbits(np.asarray(correct, dtype=bool).ravel())
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_correct(text: str, rows: int) -> np.ndarray:
    """The bool array of ``rows`` rows that :func:`pack_correct` wrote.

    Raises:
        ValueError: ``text`` holds fewer than ``rows`` bits.
    """
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    if bits.size < rows:
        raise ValueError(f"unpack_correct: {bits.size} bits, need {rows}")
    return bits[:rows].astype(bool)


def correct_of(run: dict[str, Any]) -> np.ndarray | None:
    """A run record's ``test_correct`` as a bool array (unpacked when read from
    ``results.json``); None when the record has none."""
    value = run.get("test_correct")
    if value is None:
        return None
    if isinstance(value, str):
        return unpack_correct(value, int(run["test_rows"]))
    return np.asarray(value, dtype=bool)


def paired_runs(
    runs_a: Sequence[dict[str, Any]], runs_b: Sequence[dict[str, Any]]
) -> tuple[float | None, PairedDifference | None]:
    """D over the seeds two methods share (from their test accuracies) and, when every
    run kept which test rows it got right, its :class:`PairedDifference`.

    Args:
        runs_a: A's run records (``seed``, ``test_accuracy``, optionally ``test_correct``).
        runs_b: B's.
    Returns:
        ``(D, pair)``: ``(None, None)`` when no seed is shared; ``pair`` is None when a
        run has no ``test_correct`` or the runs saw different test rows.
    """
    by_a = {r["seed"]: r for r in reversed(runs_a)}  # the first run of a seed counts
    by_b = {r["seed"]: r for r in reversed(runs_b)}
    shared = sorted(set(by_a) & set(by_b))
    if not shared:
        return None, None
    diffs = [by_a[s]["test_accuracy"] - by_b[s]["test_accuracy"] for s in shared]
    d = sum(diffs) / len(diffs)
    a = [correct_of(by_a[s]) for s in shared]
    b = [correct_of(by_b[s]) for s in shared]
    if any(c is None for c in a + b) or len({c.shape for c in a + b}) != 1:
        return d, None
    return d, paired_difference(np.stack(a), np.stack(b))


__all__ = [
    "LEVEL", "MOST_SEEDS", "PairedDifference", "correct_of", "half_width", "pack_correct",
    "paired_difference", "paired_runs", "rows_decide", "seeds_to_separate", "unpack_correct",
]  # fmt: skip
