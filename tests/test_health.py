"""Health verdicts: each rule, its precedence, its thresholds at their boundaries, and
what the table, report and JSON show for grids and for codebooks."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from stabq import FSQ, VectorQuantizer
from stabq.cli import app
from stabq.compare import Comparison, summarise, verdict
from stabq.health import (
    UNDER_USED_BELOW,
    fill_usage,
    is_grid,
    joint_perplexity,
    method_health,
    run_verdict,
)
from stabq.quantizers.registry import CAUTIONS
from stabq.report import format_table, write_comparison

CLASSES = 10


def counts_with(used: int, size: int, inputs: int, books: int = 1) -> list[list[int]]:
    """Per codebook, ``used`` codes of ``size`` sharing ``inputs`` rows (as evenly as can be)."""
    book = [inputs // used + (k < inputs % used) if k < used else 0 for k in range(size)]
    return [list(book) for _ in range(books)]


def run(
    method: str = "vq",
    counts: list[list[int]] | None = None,
    effective: float = 50.0,
    diverged: bool = False,
    events: int = 0,
    grid: bool = False,
    accuracy: float = 0.6,
    error: str | None = None,
) -> dict:
    counts = counts_with(100, 512, 1000) if counts is None else counts
    record = {
        "method": method, "seed": 0, "test_accuracy": accuracy, "test_usage": 0.2,
        "test_perplexity": effective, "test_joint_perplexity": effective,
        "test_dead_codes": None if grid else 412.0, "max_loss": 2.0, "diverged": diverged,
        "guard_events": events, "seconds": 1.0, "code_counts": counts, "grid": grid,
        "codebook_size": len(counts[0]), "num_codebooks": len(counts),
        "test_rows": 1000,
    }  # fmt: skip
    figures = {"train_loss": 1.0, "val_accuracy": accuracy, "usage": 0.2, "perplexity": effective}
    record["history"] = [{"epoch": 1, **figures, "dead_codes": None if grid else 3.0}]
    if error is not None:
        record["error"] = error
    return record


# --- the rules, their precedence and their boundaries ------------------------------------------


def at_chance(record: dict, accuracy: float, loss: float) -> dict:
    """``record`` with test accuracy ``accuracy`` and a last epoch's training loss ``loss``."""
    history = [*record["history"][:-1], {**record["history"][-1], "train_loss": loss}]
    return {**record, "test_accuracy": accuracy, "history": history}


def test_a_run_that_learned_nothing_is_stalled_however_its_codes_spread():
    chance = math.log(CLASSES)  # cross-entropy of a uniform guess
    assert run_verdict(at_chance(run(), 0.093, chance), CLASSES) == "stalled"
    # before collapsed and under-used, after diverged; the continuous model too
    assert run_verdict(at_chance(run(effective=3.0), 0.1, chance), CLASSES) == "stalled"
    few = counts_with(26, 512, 1000)
    assert run_verdict(at_chance(run(counts=few), 0.1, chance), CLASSES) == "stalled"
    assert run_verdict(at_chance(run(diverged=True), 0.1, chance), CLASSES) == "diverged"
    assert run_verdict(at_chance(run(), 0.1, chance), CLASSES, quantized=False) == "stalled"
    # both boundaries are inclusive; either condition alone is not enough
    assert run_verdict(at_chance(run(), 0.15, 0.9 * chance), CLASSES) == "stalled"
    assert run_verdict(at_chance(run(), 0.151, chance), CLASSES) == "ok"
    assert run_verdict(at_chance(run(), 0.1, 0.89 * chance), CLASSES) == "ok"
    assert run_verdict(at_chance(run(), 0.1, float("nan")), CLASSES) == "ok"
    assert run_verdict({**run(), "test_accuracy": 0.1, "history": []}, CLASSES) == "ok"


def test_the_stalled_reason_gives_the_accuracy_and_the_loss_against_chance():
    runs = [at_chance(run(), 0.09, 2.31), at_chance(run(), 0.11, 2.29), run()]
    row = method_health(runs, CLASSES)
    assert row["verdict"] == "stalled" and not row["collapsed"]
    assert row["reason"] == (
        "test accuracy 10.0% (chance 10.0%), last training loss 2.30 against ln 10 = 2.30: "
        "learned nothing; in 2 of 3 runs"
    )


def test_each_verdict():
    assert run_verdict(run(), CLASSES) == "ok"
    assert run_verdict(run(events=3), CLASSES) == "rescued"
    assert run_verdict(run(counts=counts_with(26, 512, 1000)), CLASSES) == "under-used"
    assert run_verdict(run(effective=1.5), CLASSES) == "collapsed"
    assert run_verdict(run(diverged=True), CLASSES) == "diverged"
    continuous = run("none", events=0)
    assert run_verdict(continuous, CLASSES, quantized=False) == "ok"
    assert run_verdict(run("none", events=2), CLASSES, quantized=False) == "rescued"


def test_precedence_diverged_collapsed_under_used_rescued_ok():
    few = counts_with(5, 512, 1000)
    assert run_verdict(run(counts=few, effective=1.0, events=4, diverged=True), CLASSES) == (
        "diverged"
    )
    assert run_verdict(run(counts=few, effective=1.0, events=4), CLASSES) == "collapsed"
    assert run_verdict(run(counts=few, events=4), CLASSES) == "under-used"


def test_collapse_boundary_is_the_number_of_classes():
    assert run_verdict(run(effective=float(CLASSES)), CLASSES) == "ok"
    assert run_verdict(run(effective=math.nextafter(CLASSES, 0)), CLASSES) == "collapsed"


def test_under_used_boundary_is_ten_percent_of_the_fillable():
    assert UNDER_USED_BELOW == 0.10
    # 512 codes, 1,000 inputs: 512 fillable; 100 inputs: 100 fillable
    assert fill_usage(counts_with(10, 512, 100))["fill"] == 0.10
    assert run_verdict(run(counts=counts_with(10, 512, 100)), CLASSES) == "ok"
    assert run_verdict(run(counts=counts_with(9, 512, 100)), CLASSES) == "under-used"
    # against all 512 codes 10 would be under 2%: the test set is the limit, not the book
    assert run_verdict(run(counts=counts_with(52, 512, 1000)), CLASSES) == "ok"  # 10.2%
    assert run_verdict(run(counts=counts_with(51, 512, 1000)), CLASSES) == "under-used"  # 9.96%


def test_fill_with_several_codebooks_and_fewer_inputs_than_codes():
    counts = [counts_with(u, 256, 40)[0] for u in (40, 20, 4, 1)]  # 4 codebooks, 40 inputs
    figures = fill_usage(counts)
    assert figures["fillable"] == 40 and figures["inputs"] == 40
    assert figures["used"] == (40 + 20 + 4 + 1) / 4
    assert figures["fill"] == pytest.approx((1 + 0.5 + 0.1 + 0.025) / 4)


@st.composite
def code_counts(draw) -> list[list[int]]:
    """1 to 4 codebooks of 1 to 40 codes, every codebook counting the same N rows."""
    size = draw(st.integers(1, 40))
    first = draw(st.lists(st.integers(0, 5), min_size=size, max_size=size))
    books = [first]
    for _ in range(draw(st.integers(0, 3))):
        order = draw(st.permutations(range(size)))
        books.append([first[k] for k in order])  # the same rows spread otherwise
    return books


@settings(max_examples=60, deadline=None)
@given(code_counts())
def test_fill_against_brute_force(books):
    inputs = sum(books[0])
    figures = fill_usage(books)
    fillable = min(len(books[0]), inputs)
    expected = (
        sum(sum(n > 0 for n in b) / fillable for b in books) / len(books) if fillable else 0.0
    )
    assert figures["fillable"] == fillable
    assert figures["fill"] == pytest.approx(expected)
    assert 0.0 <= figures["fill"] <= 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=50))
def test_joint_perplexity_against_brute_force(rows):
    tally = Counter(rows)
    n = len(rows)
    entropy = -sum(c / n * math.log2(c / n) for c in tally.values())
    assert joint_perplexity(torch.tensor(rows)) == pytest.approx(2**entropy)
    firsts = Counter(r[0] for r in rows)
    single = 2 ** -sum(c / n * math.log2(c / n) for c in firsts.values())
    assert joint_perplexity(torch.tensor([r[0] for r in rows])) == pytest.approx(single)


def test_dead_codes_are_the_codes_no_test_input_reached_and_grids_have_none():
    """One definition (stabq.metrics): K - used per codebook, mean over codebooks."""
    assert method_health([run(counts=counts_with(100, 512, 1000))], CLASSES)["dead_codes"] == 412
    two = [counts_with(100, 512, 1000)[0], counts_with(300, 512, 1000)[0]]
    assert method_health([run(counts=two)], CLASSES)["dead_codes"] == (412 + 212) / 2
    assert method_health([run(grid=True)], CLASSES)["dead_codes"] is None
    assert is_grid(FSQ([3, 3])) and not is_grid(VectorQuantizer(8, codebook_size=4))


def test_a_collapsed_codebook_counts_its_unreached_codes_dead():
    """vq-ema on 4 of 512 codes: collapsed, and 508 dead codes (the EMA-horizon estimate
    said 0: a code never chosen counted as alive until its initial count decayed)."""
    row = method_health([run("vq-ema", counts=counts_with(4, 512, 1000), effective=3.2)], CLASSES)
    assert row["verdict"] == "collapsed" and row["dead_codes"] == 508


# --- a method's row, the reason, the verdict line ----------------------------------------------


def test_under_used_reason_names_the_fillable():
    row = method_health([run("vq-ema", counts=counts_with(26, 512, 1000))] * 2, CLASSES)
    assert row["verdict"] == "under-used" and not row["collapsed"]
    assert row["reason"] == ("26 of 512 codes (5% of what 1,000 test inputs can fill), under 10%")
    assert row["fill"] == 26 / 512 and row["fillable"] == 512 and row["dead_codes"] == 486


def test_worst_run_decides_and_says_how_many():
    runs = [run(), run(effective=3.0), run(diverged=True, error="TrainingError: lr too high")]
    row = method_health(runs, CLASSES)
    assert row["verdict"] == "diverged" and row["collapsed"]
    assert row["reason"] == "TrainingError: lr too high; in 1 of 3 runs"
    row = method_health(runs[:2], CLASSES)
    assert row["verdict"] == "collapsed"
    assert row["reason"] == (
        "perplexity 3.0 < 10 classes: fewer effective codes than classes; in 1 of 2 runs"
    )


def test_grid_rows_show_cells_and_no_dead_codes():
    grid = run("fsq", counts=counts_with(800, 64000, 1000), effective=700.0, grid=True)
    row = method_health([grid], CLASSES)
    assert row["dead_codes"] is None and row["grid"] and row["codes_used"] == 800
    assert row["reason"] == (
        "800 of 64,000 cells (80% of what 1,000 test inputs can fill), perplexity 700"
    )
    pq = run("pq", counts=counts_with(30, 256, 1000, books=8), effective=400.0)
    assert method_health([pq], CLASSES)["reason"] == (
        "30 of 256 codes in each of 8 codebooks (12% of what 1,000 test inputs can fill), "
        "joint perplexity 400"
    )


def rows_and_runs():
    runs = [
        run("none", accuracy=0.73),
        run("vq-ema", counts=counts_with(26, 512, 1000), effective=20.0, accuracy=0.62),
        run("vq", counts=counts_with(400, 512, 1000), effective=330.0, accuracy=0.66),
        run("fsq", counts=counts_with(768, 64000, 1000), effective=650.0, grid=True, accuracy=0.69),
        run("fsq-plain", counts=counts_with(1, 64000, 1000), effective=1.0, grid=True),
    ]
    return summarise(runs, CLASSES), runs


def test_verdict_line_says_why():
    rows, _ = rows_and_runs()
    assert [r["verdict"] for r in rows] == ["ok", "under-used", "ok", "ok", "collapsed"]
    assert verdict(rows, "mnist1d") == (
        "mnist1d favours fsq: the highest test accuracy of the 2 methods judged ok or rescued "
        "(69.0%, -4.0 vs continuous; effective codes 650); not considered: vq-ema under-used "
        "(26 of 512 codes (5% of what 1,000 test inputs can fill), under 10%; known: "
        f"{CAUTIONS['vq-ema']}); fsq-plain collapsed (perplexity 1.0 < 10 classes: fewer "
        f"effective codes than classes; known: {CAUTIONS['fsq-plain']})."
    )
    none_healthy = [r for r in rows if r["verdict"] not in ("ok",) or r["method"] == "none"]
    assert verdict(none_healthy, "d").startswith("d: no quantized method was judged ok")


def test_table_report_and_json_show_cells_for_grids_and_dead_codes_for_codebooks(tmp_path):
    rows, runs = rows_and_runs()
    text = format_table(rows)
    header, *body = (re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[:6])
    table = {cells[0]: dict(zip(header, cells, strict=True)) for cells in body}
    assert table["fsq"]["used / fillable"] == "768/1000 cells" and "63232" not in text
    assert table["fsq"]["dead codes"] == "-"  # a grid has none
    assert table["vq"]["used / fillable"] == "400/512" and table["vq"]["dead codes"] == "112"
    assert table["fsq"]["gap [95%]"] == "-4.0"  # no interval: these records keep no rows
    assert table["fsq"]["vs best [95%]"] == "-" and table["vq"]["vs best [95%]"] == "-3.0"
    why = {line.split()[0]: line for line in text.splitlines()[7:]}
    assert why["vq-ema"].split(None, 1)[1] == (
        "under-used: 26 of 512 codes (5% of what 1,000 test inputs can fill), under 10%"
    )
    comparison = Comparison("d", "default", CLASSES, runs, rows, verdict(rows, "d"), 1.0, {})
    out = write_comparison(comparison, tmp_path / "r")
    payload = json.loads((out / "results.json").read_text())
    by = {r["method"]: r for r in payload["rows"]}
    assert by["fsq"]["dead_codes"] is None and by["vq"]["dead_codes"] == 112.0
    assert by["vq-ema"]["verdict"] == "under-used" and by["vq-ema"]["reason"].startswith("26 of")
    assert all(r["test_dead_codes"] is None for r in payload["runs"] if r["grid"])
    md = (out / "report.md").read_text()
    assert "| why |" in md and "| 768/1000 cells |" in md and "| under-used | 26 of 512" in md
    page = (out / "report.html").read_text()
    assert "<td class='bad'>under-used</td>" in page and "<td>ok</td>" in page


# --- one real run through the command line -----------------------------------------------------


@pytest.mark.outcome
def test_cli_compare_json_carries_verdicts_and_reasons(tmp_path):
    result = CliRunner().invoke(
        app,
        ["compare", "--data", "synthetic:16", "--methods", "none,vq-ema,fsq,pq", "--seeds", "1",
         "--epochs", "1", "--quiet", "--out", str(tmp_path / "rep")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "rep" / "results.json").read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    allowed = {"ok", "under-used", "collapsed", "stalled", "diverged", "rescued"}
    assert all(r["verdict"] in allowed and r["reason"] for r in rows.values())
    assert rows["fsq"]["grid"] is True and rows["fsq"]["dead_codes"] is None
    assert rows["vq-ema"]["grid"] is False and rows["vq-ema"]["dead_codes"] is not None
    fsq_run = next(r for r in payload["runs"] if r["method"] == "fsq")
    assert fsq_run["test_dead_codes"] is None
    assert all(h["dead_codes"] is None for h in fsq_run["history"])
    for r in payload["runs"]:  # the row's figures are the run's, recomputed here
        if r["code_counts"]:
            fill = fill_usage(r["code_counts"])["fill"]
            assert rows[r["method"]]["fill"] == pytest.approx(fill)
    assert rows["pq"]["fillable"] == 256 and rows["pq"]["num_codebooks"] == 8
    for name, row in rows.items():
        assert f"  {name}" in result.stdout and row["reason"] in result.stdout
