"""Paired differences (stabq.compare.paired): exact values against the formula written out,
their properties, the rows and verdict a comparison builds from them, and one comparison
trained end to end with a method under two names and a method far worse."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from stabq.compare import METHODS, Method, compare, summarise, verdict
from stabq.compare.paired import (
    MOST_SEEDS,
    PairedDifference,
    correct_of,
    half_width,
    pack_correct,
    paired_difference,
    paired_runs,
    rows_decide,
    seeds_to_separate,
    unpack_correct,
)
from stabq.compare.plots import plot_accuracy
from stabq.compare.runs import within_uncertainty
from stabq.report import format_table, write_comparison

T = 0.975  # the 95% interval's quantile


def brute(a: list[list[int]], b: list[list[int]]) -> tuple[float, float, float]:
    """D and its interval as the module docstring writes them, in plain Python."""
    n, rows = len(a), len(a[0])
    d = [sum(a[s][i] - b[s][i] for i in range(rows)) / rows for s in range(n)]
    delta = [sum(a[s][i] - b[s][i] for s in range(n)) / n for i in range(rows)]
    parts = []
    if n > 1:
        parts.append((statistics.variance(d) / n, n - 1))
    if rows > 1:
        parts.append((statistics.variance(delta) / rows, rows - 1))
    se2 = sum(v for v, _ in parts)
    df = se2**2 / sum(v**2 / dof for v, dof in parts)
    half = stats.t.ppf(T, df) * math.sqrt(se2)
    mean = sum(d) / n
    return mean, mean - half, mean + half


@st.composite
def pairs(draw, most_seeds: int = 5, most_rows: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Two ``(n, N)`` bool arrays: per seed, per test row, whether A (B) got it right."""
    shape = (draw(st.integers(1, most_seeds)), draw(st.integers(2, most_rows)))
    return draw(arrays(bool, shape)), draw(arrays(bool, shape))


# --- exact values ------------------------------------------------------------------------------


def test_a_small_case_by_hand():
    """diff = [[0,1,0,0],[1,0,0,0]]: d_s = 0.25 on both seeds (no seed spread), delta =
    [0.5, 0.5, 0, 0] with sample variance 1/12: SE^2 = 1/48 on 3 dof."""
    a = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=bool)
    b = np.array([[1, 0, 0, 1], [0, 0, 1, 1]], dtype=bool)
    pair = paired_difference(a, b)
    half = stats.t.ppf(T, 3) / math.sqrt(48)
    assert pair.difference == 0.25 and pair.seed_sd == 0.0 and pair.df == pytest.approx(3.0)
    assert pair.row_var == pytest.approx(1 / 12)
    assert (pair.low, pair.high) == pytest.approx((0.25 - half, 0.25 + half))
    assert pair.cannot_tell and rows_decide(pair) and seeds_to_separate(pair) is None


@settings(max_examples=80, deadline=None)
@given(pairs())
def test_interval_against_brute_force(pair_of):
    a, b = pair_of
    diff = a.astype(int) - b.astype(int)
    assume(len({*diff.mean(axis=1)}) > 1 or len({*diff.mean(axis=0)}) > 1)  # SE > 0
    pair = paired_difference(a, b)
    mean, low, high = brute(a.astype(int).tolist(), b.astype(int).tolist())
    assert pair.difference == pytest.approx(mean, abs=1e-12)
    assert (pair.low, pair.high) == pytest.approx((low, high), rel=1e-9, abs=1e-12)


def test_one_seed_leaves_the_test_rows_only():
    a = np.array([[1, 1, 1, 0, 1, 0]], dtype=bool)
    b = np.array([[1, 0, 0, 0, 1, 1]], dtype=bool)
    pair = paired_difference(a, b)
    assert pair.seed_sd is None and pair.df == pytest.approx(5.0)
    assert pair.high - pair.difference == pytest.approx(
        stats.t.ppf(T, 5) * math.sqrt(statistics.variance([0, 1, 1, 0, 0, -1]) / 6)
    )
    assert seeds_to_separate(pair) is None  # no seed spread known
    assert paired_difference(a[0], b[0]) == pair  # a 1-D array is one seed


def test_shapes_must_match():
    with pytest.raises(ValueError, match="shapes"):
        paired_difference(np.ones((2, 3), bool), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="shapes"):
        paired_difference(np.ones((2, 0), bool), np.ones((2, 0), bool))


def test_half_width_when_nothing_or_no_spread_is_known():
    assert half_width(None, 1, None, 1) == (math.inf, pytest.approx(math.nan, nan_ok=True))
    assert half_width(0.0, 3, 0.0, 10) == (0.0, math.inf)


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(pairs())
def test_swapping_a_and_b_negates_the_difference_and_keeps_the_width(pair_of):
    a, b = pair_of
    ab, ba = paired_difference(a, b), paired_difference(b, a)
    assert ba.difference == pytest.approx(-ab.difference, abs=1e-12)
    assert (ba.low, ba.high) == pytest.approx((-ab.high, -ab.low), abs=1e-12)
    assert ba.cannot_tell == ab.cannot_tell or 0.0 in (ab.low, ab.high, ba.low, ba.high)


@settings(max_examples=60, deadline=None)
@given(pairs(), st.data())
def test_the_same_change_to_both_keeps_the_difference_and_the_interval(pair_of, data):
    """Where A and B agree, flipping both (both right <-> both wrong) changes no d_s and
    no delta_i: the accuracy of both moves by the same amount."""
    a, b = pair_of
    flip = data.draw(arrays(bool, a.shape)) & (a == b)
    before, after = paired_difference(a, b), paired_difference(a ^ flip, b ^ flip)
    assert after.difference == pytest.approx(before.difference, abs=1e-12)
    assert (after.low, after.high) == pytest.approx((before.low, before.high), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(pairs(), st.randoms(use_true_random=False))
def test_the_order_of_seeds_and_rows_does_not_matter(pair_of, rng):
    a, b = pair_of
    seeds, rows = list(range(a.shape[0])), list(range(a.shape[1]))
    rng.shuffle(seeds)
    rng.shuffle(rows)
    before, after = paired_difference(a, b), paired_difference(a[seeds][:, rows], b[seeds][:, rows])
    assert (after.difference, after.low, after.high) == pytest.approx(
        (before.difference, before.low, before.high), abs=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(pairs())
def test_the_interval_holds_the_difference_and_the_same_predictions_give_zero(pair_of):
    a, b = pair_of
    pair = paired_difference(a, b)
    assert pair.low <= pair.difference <= pair.high
    same = paired_difference(a, a.copy())
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0) and same.cannot_tell
    assert seeds_to_separate(same) is None


@settings(max_examples=60, deadline=None)
@given(pairs(most_seeds=6, most_rows=60))
def test_the_seeds_estimate_agrees_with_the_interval(pair_of):
    """Separated at n seeds: the estimate is at most n; not separated: none, or more."""
    pair = paired_difference(*pair_of)
    found = seeds_to_separate(pair)
    if pair.seeds == 1:
        assert found is None
    elif not pair.cannot_tell:
        assert found is not None and found <= pair.seeds
    else:
        assert found is None or found > pair.seeds
    if found is not None:  # the estimate is the first n that would do (beyond the seeds run)
        start = pair.seeds + 1 if pair.cannot_tell else 2
        wide = [
            half_width(pair.seed_sd, n, pair.row_var, pair.rows)[0] for n in range(start, found)
        ]
        assert all(w >= abs(pair.difference) for w in wide)
        assert half_width(pair.seed_sd, found, pair.row_var, pair.rows)[0] < abs(pair.difference)


def test_more_seeds_or_more_rows():
    """A wide seed spread with a row part that would allow it: many seeds; a row part wider
    than the difference: no count of seeds, more test rows."""
    spread = PairedDifference(0.01, -0.2, 0.22, 2, 10**6, seed_sd=0.1, row_var=0.0, df=1.0)
    assert seeds_to_separate(spread) is None and not rows_decide(spread)
    assert seeds_to_separate(spread, most=2000) == next(
        n for n in range(3, 2000) if stats.t.ppf(T, n - 1) * 0.1 / math.sqrt(n) < 0.01
    )
    rows = PairedDifference(0.02, -0.01, 0.05, 3, 100, seed_sd=0.001, row_var=0.03, df=99.0)
    assert seeds_to_separate(rows, most=MOST_SEEDS) is None and rows_decide(rows)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), max_size=100))
def test_packed_rows_come_back(bits):
    packed = pack_correct(bits)
    assert unpack_correct(packed, len(bits)).tolist() == bits
    assert len(packed) <= 4 * math.ceil(math.ceil(len(bits) / 8) / 3)  # 1 bit a row, base64
    with pytest.raises(ValueError, match="bits"):
        unpack_correct(packed, 8 * math.ceil(len(bits) / 8) + 1)


# --- the rows, the table and the verdict of a comparison ---------------------------------------


def record(method: str, seed: int, correct: np.ndarray, perplexity: float = 300.0) -> dict:
    return {
        "method": method, "seed": seed, "test_accuracy": float(correct.mean()),
        "test_correct": correct, "test_rows": correct.size, "test_usage": 0.5,
        "test_perplexity": perplexity, "test_dead_codes": 3, "max_loss": 2.0,
        "diverged": False, "guard_events": 0, "seconds": 1.0,
    }  # fmt: skip


def three_methods(seeds: int = 3, rows: int = 1000) -> list[dict]:
    """none, fsq, a second name for fsq (the same predictions) and vq, far worse."""
    rng = np.random.default_rng(0)
    records = []
    for seed in range(seeds):
        fsq = rng.random(rows) < 0.72
        records += [
            record("none", seed, rng.random(rows) < 0.73),
            record("fsq", seed, fsq),
            record("fsq-twin", seed, fsq.copy()),
            record("vq", seed, rng.random(rows) < 0.40),
        ]
    return sorted(records, key=lambda r: ["none", "fsq", "fsq-twin", "vq"].index(r["method"]))


def test_the_same_method_under_two_names_cannot_be_told_apart():
    rows = {r["method"]: r for r in summarise(three_methods(), 10)}
    twin = rows["fsq-twin"]
    assert twin["to_best"] == 0.0 and (twin["to_best_low"], twin["to_best_high"]) == (0.0, 0.0)
    assert twin["separate_seeds"] is None and rows["fsq"]["to_best"] is None
    assert twin["gap"] == rows["fsq"]["gap"] and twin["gap_low"] == rows["fsq"]["gap_low"]
    line = verdict(list(rows.values()), "d")
    assert line.startswith("d favours fsq: ")
    assert "fsq-twin is within the uncertainty of fsq over 3 seeds (95% interval of the " in line
    assert "paired difference contains 0); fsq-twin does not differ at all." in line


def test_a_method_far_worse_is_separated_and_the_table_shows_its_interval():
    rows = {r["method"]: r for r in summarise(three_methods(), 10)}
    vq = rows["vq"]
    assert vq["to_best_high"] < 0 and vq["gap_high"] < 0  # the intervals exclude 0
    assert vq["to_best_low"] < vq["to_best"] < vq["to_best_high"]
    assert vq["separate_seeds"] == 2 and vq["needs_rows"] is None
    gap = f"{100 * vq['gap']:+.1f} [{100 * vq['gap_low']:+.1f}, {100 * vq['gap_high']:+.1f}]"
    assert f"  {gap}  " in format_table(list(rows.values()))
    assert f"| {gap} |" in format_table(list(rows.values()), markdown=True)
    only_vq = summarise([r for r in three_methods() if r["method"] != "fsq-twin"], 10)
    assert (
        "; vq is below it beyond the uncertainty over 3 seeds (95% interval of the paired "
        "difference excludes 0)."
    ) in verdict(only_vq, "d")


def test_a_gap_is_the_paired_mean_over_the_seeds_both_ran():
    records = three_methods()
    short = [r for r in records if not (r["method"] == "vq" and r["seed"] == 2)]
    rows = {r["method"]: r for r in summarise(short, 10)}
    accs = {(r["method"], r["seed"]): r["test_accuracy"] for r in records}
    paired_mean = statistics.mean(accs["vq", s] - accs["none", s] for s in (0, 1))
    assert rows["vq"]["gap"] == pytest.approx(paired_mean, abs=1e-12)
    assert rows["vq"]["seeds"] == 2


def best_and(*others: dict, seeds: int = 3) -> tuple[dict, list[dict]]:
    best = {"method": "vq", "verdict": "ok", "seeds": seeds}
    return best, [best, *others]


def other(name: str, low: float, high: float, seeds: int | None = None, rows: bool | None = None):
    return {
        "method": name, "verdict": "ok", "to_best": (low + high) / 2, "to_best_low": low,
        "to_best_high": high, "separate_seeds": seeds, "needs_rows": rows,
    }  # fmt: skip


def test_the_verdict_says_what_would_separate_the_methods_within_the_uncertainty():
    best, rows = best_and(
        other("rvq", -0.03, 0.01, seeds=8),
        other("pq", -0.02, 0.004, seeds=12),
        other("fsq", -0.01, 0.008, rows=True),
        other("lfq", -0.02, 0.018, rows=False),
        other("bsq", -0.3, -0.2, seeds=2),
        {**other("vq-ema", -0.5, 0.5), "verdict": "under-used"},  # not considered
    )
    assert within_uncertainty(rows, best) == (
        "rvq, pq, fsq and lfq are within the uncertainty of vq over 3 seeds (95% interval of "
        "the paired difference contains 0); about 8 seeds would separate rvq, 12 pq; for fsq "
        "more test rows, not more seeds, would be needed; for lfq even 50 seeds would not do"
    )
    best, rows = best_and(other("rvq", -0.03, 0.01), seeds=1)
    assert within_uncertainty(rows, best) == (
        "rvq is within the uncertainty of vq on 1 seed (95% interval of the paired difference "
        "contains 0; with 1 seed it covers the test rows only, not training randomness)"
    )
    best, rows = best_and(other("rvq", -0.3, -0.1), other("pq", -0.2, -0.01))
    assert within_uncertainty(rows, best) == (
        "the other 2 are below it beyond the uncertainty over 3 seeds (95% interval of the "
        "paired difference excludes 0)"
    )
    best, rows = best_and({**other("rvq", 0, 0), "to_best_low": None})
    assert within_uncertainty(rows, best) == ""  # records that kept no rows: nothing to say


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twins():
    """none, fsq, fsq under a second name and a one-code VQ (chance accuracy), 2 seeds x 2
    epochs on mnist1d: fsq and its twin train bit for bit alike (the runs are seeded)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(METHODS, "fsq-twin", replace(METHODS["fsq"], name="fsq-twin"))
        patch.setitem(METHODS, "vq-1", Method("vq-1", "vq", {"codebook_size": 1}))
        yield compare("mnist1d", "none,fsq,fsq-twin,vq-1", seeds=2, epochs=2, progress=False)


def test_a_method_under_two_names_differs_by_exactly_zero_end_to_end(twins):
    runs = {(r["method"], r["seed"]): r for r in twins.records}
    for seed in (0, 1):
        fsq, twin = runs["fsq", seed]["test_correct"], runs["fsq-twin", seed]["test_correct"]
        assert fsq.dtype == bool and np.array_equal(fsq, twin)
        assert fsq.mean() == runs["fsq", seed]["test_accuracy"]
    by = [[r for r in twins.records if r["method"] == m] for m in ("fsq-twin", "fsq")]
    d, pair = paired_runs(*by)
    assert d == 0.0 and (pair.difference, pair.low, pair.high) == (0.0, 0.0, 0.0)
    assert pair.cannot_tell and pair.seeds == 2 and pair.rows == 1000


@pytest.mark.outcome  # which methods are healthy depends on how training ends
def test_the_verdict_cannot_tell_the_twins_apart_end_to_end(twins):
    twin = next(r for r in twins.rows if r["method"] == "fsq-twin")
    assert twin["to_best"] == 0.0 and twin["to_best_low"] == twin["to_best_high"] == 0.0
    assert twins.verdict.startswith("mnist1d favours fsq: ")
    assert "fsq-twin is within the uncertainty of fsq over 2 seeds" in twins.verdict
    assert "contains 0); fsq-twin does not differ at all;" in twins.verdict


@pytest.mark.outcome  # far apart on every kernel path, but the best is a training outcome
def test_a_one_code_bottleneck_is_separated_end_to_end(twins):
    """One code: the head sees the same input for every row, ~10% against ~45%."""
    rows = {r["method"]: r for r in twins.rows}
    assert rows["vq-1"]["gap_high"] < 0 and rows["vq-1"]["to_best_high"] < 0
    assert rows["none"]["gap"] is None and rows["fsq"]["gap_low"] < rows["fsq"]["gap_high"]


def test_results_json_packs_the_rows_and_gives_the_same_intervals_back(twins, tmp_path):
    out = write_comparison(twins, tmp_path / "r")
    payload = json.loads((out / "results.json").read_text())
    run = payload["runs"][0]
    assert isinstance(run["test_correct"], str) and len(run["test_correct"]) == 168  # 1,000 bits
    assert np.array_equal(correct_of(run), twins.records[0]["test_correct"])
    again = summarise(payload["runs"], twins.num_classes)
    for key in ("gap", "gap_low", "gap_high", "to_best", "to_best_low", "to_best_high"):
        assert [r[key] for r in again] == [r[key] for r in twins.rows], key
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"gap_low", "gap_high", "to_best", "separate_seeds"} <= set(header)


def test_the_accuracy_plot_draws_each_gap_with_its_interval(twins):
    fig = plot_accuracy(twins.rows)
    _, gaps = fig.axes
    assert len(gaps.containers) == 3  # every method but the reference, with its error bars
    assert [line.get_ydata()[0] for line in gaps.lines[:1]] == [0.0]  # the zero line
    vq = next(r for r in twins.rows if r["method"] == "vq-1")
    colours = [c.lines[0].get_color() for c in gaps.containers]
    assert colours[-1] == "tab:red" and vq["verdict"] == "stalled"  # one code: chance


def test_a_failed_method_s_wide_interval_does_not_flatten_the_healthy_ones():
    rows = [
        {"method": "none", "verdict": "ok", "accuracy": 0.9, "accuracy_sd": 0.01, "gap": None},
        {"method": "fsq", "verdict": "ok", "accuracy": 0.91, "accuracy_sd": 0.01,
         "gap": 0.01, "gap_low": -0.02, "gap_high": 0.04},
        {"method": "vq-ema", "verdict": "collapsed", "accuracy": 0.7, "accuracy_sd": 0.3,
         "gap": -0.2, "gap_low": -0.85, "gap_high": 0.46},
    ]  # fmt: skip
    _, gaps = plot_accuracy(rows).axes
    low, high = gaps.get_ylim()
    assert (low, high) == (-3.0, 5.0)  # fsq's [-2, +4] and 0, a point of margin each side
    assert sorted(t.get_text() for t in gaps.texts) == ["+46", "-85"]  # the cut ends
