"""Distributed training: 2 real gloo processes keep every codebook identical, agree with one
process on the joined batch, survive uneven and empty per-rank batches, and train from the CLI.

The 2-process runs are started by torchrun (tests/distributed_worker.py) once per module; each
is bounded by a timeout that fails the test, so a collective entered by only one rank (a hang)
shows as a failure, not a stuck suite.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

import distributed_worker as worker
import stabq
from stabq import ProductQuantizer, VectorQuantizer, distributed
from stabq.cli import app
from stabq.metrics import CodebookUsage

pytestmark = pytest.mark.outcome  # the verdict depends on how training ends

SRC = Path(stabq.__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 240  # far above the ~15 s these take on a loaded 2-core machine: only a hang hits it


# Failures of the launch itself, not of stabq: --standalone picks a free port, frees it and
# hands it to the workers, so another process on the machine may take it in between.
PORT_RACE = (
    "Address already in use",
    "EADDRINUSE",
    "DistNetworkError",
    "RendezvousConnectionError",
)


def torchrun(*args: str, cwd: Path) -> str:
    """Run ``torchrun --standalone --nproc_per_node=2 ARGS``; fail the test on error or hang.

    A launch that lost its port to another process is retried once."""
    try:
        return _torchrun_once(*args, cwd=cwd)
    except AssertionError as failure:
        if not any(sign in str(failure) for sign in PORT_RACE):
            raise
        return _torchrun_once(*args, cwd=cwd)


def _torchrun_once(*args: str, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]),
    }
    # a file, not a pipe: a hung worker holding a pipe open would block reading it
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [*cmd, *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop(proc)
            log.seek(0)
            pytest.fail(
                f"2-process run did not finish in {TIMEOUT_S} s (a hang):\n{log.read()[-3000:]}"
            )
        log.seek(0)
        output = log.read()
    assert proc.returncode == 0, output[-5000:]
    return output


def stop(proc: subprocess.Popen) -> None:
    """End torchrun and its workers (they run in sessions of their own)."""
    workers = children(proc.pid)
    proc.terminate()  # torchrun passes SIGTERM on to its workers
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid, cmdline in workers.items():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:  # still that worker
                os.kill(pid, signal.SIGKILL)


def children(pid: int) -> dict[int, bytes]:
    """Direct children of ``pid`` and their command lines, from /proc (none without it)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
    return found


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """Every case of distributed_worker.py run on 2 gloo ranks; the per-rank files."""
    out = tmp_path_factory.mktemp("ranks")
    torchrun(str(TESTS / "distributed_worker.py"), str(out), cwd=out)
    return out


def rank_states(out: Path, name: str) -> tuple[dict, dict]:
    return tuple(load_file(out / f"{name}.rank{r}.safetensors") for r in (0, 1))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between ranks"


# ---- 2 processes: codebooks identical, and equal to one process on the joined batch ----


@pytest.mark.parametrize("name", list(worker.CODEBOOK_CASES))
def test_codebook_buffers_identical_on_every_rank(ranks, name):
    """EMA sums, cluster sizes, codes (and k-means init, dead-code rows) match bit for bit,
    though each rank saw other rows, some steps none, and draws from its own RNG."""
    a, b = rank_states(ranks, name)
    assert any("cluster_size" in k for k in a) and any(k.endswith("embed") for k in a)
    assert_identical(a, b)


@pytest.mark.parametrize("name", list(worker.CODEBOOK_CASES))
def test_two_ranks_with_split_batches_equal_one_process_with_the_whole_batch(ranks, name):
    """Rank 0 takes the first rows of each global batch, rank 1 the rest (5/19, 12/12,
    24/0, 3/21, 0/24, 0/0, 12/8): the EMA statistics and codebook equal one process's run on
    the whole batches, to float rounding of the summed embeddings."""
    reference, replaced = worker.run_codebook_case(name)
    a, _ = rank_states(ranks, name)
    for key, value in reference.items():
        torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6, msg=key)
    if name != "vq-vanilla":
        assert replaced > 0, "the case must exercise dead-code replacement"


def test_codebook_usage_counts_over_all_ranks(ranks):
    union = CodebookUsage(8, 2)
    union.update(torch.cat([worker.usage_indices(0), worker.usage_indices(1)]))
    expected = union.compute()
    assert expected["samples"] == 12 and expected["per_codebook"][0]["usage"] == 1.0
    for r in (0, 1):
        figures = json.loads((ranks / f"usage.rank{r}.json").read_text())
        assert figures["True"] == expected  # same arithmetic; JSON keeps floats exactly
        alone = CodebookUsage(8, 2)
        alone.update(worker.usage_indices(r))
        assert figures["False"] == alone.compute()


def test_monitor_and_evaluate_model_on_rank_0_alone_report_that_rank(ranks):
    """Called on rank 0 alone (rank 1 went on to DDP's collectives): both returned, with
    rank 0's own rows, as in a plain process, not sums over ranks."""
    figures = json.loads((ranks / "alone.rank0.json").read_text())
    assert figures == json.loads(json.dumps(worker.run_on_rank_0_alone()))
    assert figures["monitor"]["samples"] == worker.GLOBAL
    assert not (ranks / "alone.rank1.json").exists()


def test_rank_0_decides_dead_codes_even_when_ranks_disagree(ranks):
    """Rank 0 sees 4 dead codes, rank 1 none: both replace rank 0's 4, with the same rows of
    the joined batch, and neither waits alone in a collective."""
    a, b = rank_states(ranks, "drifted")
    union = worker.batches()[0][:24]
    for state in (a, b):
        codes = state["codebook.embed"][0, :4]
        assert all(any(torch.equal(c, row) for row in union) for c in codes)
    torch.testing.assert_close(a["codebook.embed"][:, :4], b["codebook.embed"][:, :4])
    torch.testing.assert_close(a["codebook.embed_sum"][:, :4], b["codebook.embed_sum"][:, :4])


def test_own_loop_with_fewer_batches_on_one_rank_finishes_in_step(ranks):
    """Rank 1 runs out of batches a step before rank 0; even_batches hands it an empty one,
    so both enter the same collectives (a plain loop would leave rank 0 waiting forever),
    and the result is one process's on the joined batches."""
    a, b = rank_states(ranks, "uneven-loop")
    assert_identical(a, b)
    reference = worker.run_uneven_loop(0, 1)
    for key, value in reference.items():
        torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_the_guard_in_a_users_ddp_loop_decides_the_same_on_every_rank(ranks):
    """Rank 1 alone sees the poisoned rows, rank 0 alone the loss spike: both ranks leave
    out the one step and undo the other, and end as one process on the whole batches."""
    a, b = rank_states(ranks, "guarded-loop")
    assert_identical(a, b)
    events = [json.loads((ranks / f"guarded-loop.rank{r}.json").read_text()) for r in (0, 1)]
    assert events[0] == events[1]
    assert [e["step"] for e in events[0]] == [worker.POISONED_STEP, worker.SPIKED_STEP]
    reference, ref_events = worker.run_guarded_loop(0, 1)
    assert ref_events == events[0]
    for key, value in reference.items():
        torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", list(worker.DDP_CASES))
def test_codebook_free_quantizers_keep_identical_parameters_under_ddp(ranks, name):
    a, b = rank_states(ranks, name)
    torch.manual_seed(0)
    initial = worker.DDP_CASES[name]().state_dict()
    assert_identical(a, b)
    assert any(not torch.equal(a[k], initial[k]) for k in a), "SGD steps must change the params"


@pytest.mark.parametrize("name", list(worker.BATCH_STAT_CASES))
def test_batch_statistics_over_split_batches_equal_one_process(ranks, name):
    """SimVQ's k-means basis, LFQ's and BSQ's codebook entropy, FSQ's, ResidualFSQ's and
    Gumbel's batch normalisation and Gumbel's diversity loss use the whole batch: on SPLITS
    (5/19, 24/0, 0/24, 0/0, ...) with losses weighed by each rank's rows and gradients
    averaged, the ranks stay identical, and every step's loss and gradients and the final
    state are one process's on the joined batches.

    Tolerance from float32 (eps 1.2e-7): a rank's partial sums over at most 24 rows joined by
    the all-reduce round differently from one process's sum, a few eps relative per
    reduction. The worst entry measured uses 8% of rtol 1e-5 (atol 1e-6 near 0) after 7 SGD
    steps; rank-local statistics (a BatchNorm per rank, k-means without the broadcast) miss
    by 10^4 to 10^6 times the tolerance.
    """
    a, b = rank_states(ranks, name)
    shared = [{k: v for k, v in state.items() if not k.startswith("loss.")} for state in (a, b)]
    assert_identical(*shared)  # each rank's loss is its own share
    reference = worker.run_batch_stat_case(name)
    assert reference.keys() == a.keys()
    for step in range(len(worker.SPLITS)):
        joined = (a[f"loss.{step}"] + b[f"loss.{step}"]) / 2  # ranks' losses, weighed by rows
        torch.testing.assert_close(joined, reference[f"loss.{step}"], rtol=1e-5, atol=1e-6)
    for key, value in reference.items():
        if not key.startswith("loss."):
            torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch.manual_seed(0)
    initial = worker.BATCH_STAT_CASES[name]().state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in initial), "the case must train"
    if name == "simvq-kmeans":
        assert bool(a["initted"]) and not torch.equal(a["basis"], initial["basis"])
    if name in (
        "rfsq",
        "fsq-prenorm",
        "gumbel-logits",
    ):  # 6 steps with rows: the 0/0 step is normalised by the running figures
        key = "q.pre_norm" if name == "gumbel-logits" else "pre_norm"
        assert int(a[f"{key}.num_batches_tracked"]) == 6


@pytest.mark.parametrize(
    "name",
    [
        "trainer-even",
        "trainer-cnn1d",
        "trainer-rfsq",
        "trainer-simvq",
        "trainer-lfq",
        "trainer-transformer",
    ],
)
def test_trainer_on_two_ranks_equals_one_process(ranks, name):
    """stabq.train (repaired VQ, k-means, dead codes, guards on, dropout 0; the MLP or the
    CNN encoder; or the rfsq, simvq, lfq presets, in float64: see
    worker.TRAIN_QUANTIZERS) on 2 ranks, 128 rows, global batch 32: the same weights, buffers
    and validation figures as one process."""
    a, b = rank_states(ranks, name)
    assert_identical(a, b)
    history = [json.loads((ranks / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
    assert history[0] == history[1]
    reference, ref_history = worker.run_trainer_case(name)
    for key, value in reference.items():
        torch.testing.assert_close(a[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for mine, ref in zip(history[0], ref_history, strict=True):
        assert mine["val_accuracy"] == ref["val_accuracy"]
        assert math.isclose(mine["train_loss"], ref["train_loss"], rel_tol=1e-5)
        assert math.isclose(mine["perplexity"], ref["perplexity"], rel_tol=1e-5)
    if name != "trainer-cnn1d":
        assert history[0][-1]["val_accuracy"] > 0.5  # it learned: 3 classes, chance is 1/3
    else:  # the CNN's 12 steps leave it near chance, but they moved it
        untrained = worker.trainer_model(name).state_dict()
        assert any(not torch.equal(a[k], untrained[k]) for k in untrained if "projector" in k)


def test_trainer_with_rows_that_do_not_split_evenly_finishes_identically(ranks):
    """129 rows, global batch 32 (16 a rank): split naively, rank 0 would take 5 batches of
    its 65 rows and rank 1 four of its 64, and rank 0 would wait forever in a collective;
    padded as DistributedSampler pads, both take 5 steps and end identical."""
    assert distributed.steps_per_epoch(129, 32, world=2) == 5
    a, b = rank_states(ranks, "trainer-odd")
    assert_identical(a, b)
    history = [json.loads((ranks / f"trainer-odd.rank{r}.json").read_text()) for r in (0, 1)]
    assert history[0] == history[1] and len(history[0]) == 3


def test_two_stage_training_on_two_ranks_ends_identical(ranks):
    """Stage 1 (quantization off, its projections unused), k-means on the union of the
    ranks' features, stage 2 with the projector frozen: every rank ends the same."""
    a, b = rank_states(ranks, "trainer-two-stage")
    assert_identical(a, b)
    history = [json.loads((ranks / f"trainer-two-stage.rank{r}.json").read_text()) for r in (0, 1)]
    assert history[0] == history[1]
    assert [row["quantized"] for row in history[0]] == [False, True, True]


def test_torchrun_stabq_train_writes_one_model_that_evaluates(tmp_path):
    """``torchrun --nproc_per_node=2 -m stabq train`` on digits: rank 0 alone writes the
    model and the summary, and ``stabq evaluate`` reads it like a one-process model."""
    args = ["train", "--data", "digits", "--quantizer", "vq", "--epochs", "6", "--hidden", "32"]
    args += ["--bottleneck-dim", "16", "--batch-size", "64", "--lr", "1e-2"]
    output = torchrun("-m", "stabq", *args, "--out", "two", cwd=tmp_path)
    assert output.count("val accuracy") == 1, output  # one summary: rank 0's
    single = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one"), "--quiet"])
    assert single.exit_code == 0, single.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no stray temp dirs
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    figures = {}
    for run in ("one", "two"):
        result = CliRunner().invoke(
            app, ["evaluate", str(tmp_path / run), "--data", "digits", "--json"]
        )
        assert result.exit_code == 0, result.output
        figures[run] = json.loads(result.output)
        assert figures[run]["rows"] == 360
        history = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        assert len(history) == 6  # one writer: six epochs, not twelve
    assert figures["two"].keys() == figures["one"].keys()
    # Two ranks sum their gradients in another order than one process: after 6 epochs the
    # runs are as far apart as two seeds (one process, seeds 0-3, default and avx512 kernel
    # paths: 0.525-0.700), so the two are not compared; each learned (chance is 0.1).
    assert figures["two"]["accuracy"] > 0.3 and figures["one"]["accuracy"] > 0.3


# ---- one process: the sharding arithmetic and the no-op path ----


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 300),
    batch=st.integers(1, 80),
    world=st.integers(1, 5),
)
def test_shards_give_every_rank_equal_nonempty_batches_that_join_to_one_process_batches(
    n, batch, world
):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [distributed.shard_batches(order, batch, world, r) for r in range(world)]
    steps = distributed.steps_per_epoch(n, batch, world)
    b = shards[0][1]
    assert b == -(-batch // world) and all(bs == b for _, bs in shards)
    m = -(-n // world)
    padded = torch.cat([order] * (-(-m * world // n)))[: m * world]
    seen = []
    for i in range(steps):
        parts = [shard[i * b : (i + 1) * b] for shard, _ in shards]
        assert parts[0].numel() > 0 and all(p.numel() == parts[0].numel() for p in parts)
        joined = torch.cat(parts)
        assert torch.equal(joined, padded[i * world * b : (i + 1) * world * b])
        seen.append(joined)
    assert all(shard.numel() == m and -(-m // b) == steps for shard, _ in shards)
    assert torch.equal(torch.cat(seen), padded)
    assert set(torch.cat(seen).tolist()) == set(range(n))
    if world == 1:
        assert torch.equal(shards[0][0], order) and steps == max(1, -(-n // batch))


def test_helpers_are_no_ops_without_a_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.init_from_env()
    assert not distributed.is_distributed()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    t = torch.arange(6.0)
    distributed.all_reduce_sum_(t, t[:2])
    distributed.broadcast_(t)
    assert torch.equal(t, torch.arange(6.0))
    assert distributed.gather_rows(t[None]).data_ptr() == t.data_ptr()
    assert distributed.mean_and_max([1.5], [2.0]) == ([1.5], [2.0])
    assert distributed.all_true(False) is False
    assert distributed.sum_over_ranks(t) is t
    norm, z = torch.nn.BatchNorm1d(3, affine=False), torch.randn(5, 3)
    standardised = torch.nn.functional.batch_norm(z, None, None, training=True)
    torch.testing.assert_close(distributed.batch_norm(norm, z), standardised)
    assert int(norm.num_batches_tracked) == 1  # norm(z) itself: its running figures step
    items = [t, t[:2]]
    assert [id(b) for b in distributed.even_batches(items)] == [id(b) for b in items]
    usage = CodebookUsage(4)
    usage.update(torch.tensor([0, 0, 1]))
    assert usage.compute()["samples"] == 3


def test_an_empty_training_batch_leaves_one_process_codebooks_alone():
    """What an idle rank feeds: ``x[:0]`` runs (PQ included) and changes nothing alone."""
    for q in (VectorQuantizer(8, 16, kmeans_init=True), ProductQuantizer(8, 2, 4)):
        q.train()
        before = {k: v.clone() for k, v in q.state_dict().items()}
        out = q(torch.zeros(0, 8))
        assert out.quantized.shape == (0, 8) and out.indices.shape[0] == 0
        assert_identical(before, q.state_dict())
