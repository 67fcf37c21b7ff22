"""`CodebookUsageMetric`: the torchmetrics metric gives `CodebookUsage`'s figures exactly, on
one process and summed over 2 gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import stabq
from stabq import CodebookUsage, ConfigError, ShapeError
from stabq.integrations.torchmetrics import CodebookUsageMetric


def batches(seed: int, size: int, books: int, count: int = 3) -> list[torch.Tensor]:
    """``count`` batches of indices in [-1, size) (some -1: quantization off)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (17, books) if books > 1 else (17,)
    return [torch.randint(-1, size, shape, generator=gen) for _ in range(count)]


def both(size: int, books: int, grid: bool, data: list[torch.Tensor]) -> tuple[dict, dict]:
    usage = CodebookUsage(size, books, grid=grid, sync=False)
    metric = CodebookUsageMetric(size, books, grid=grid)
    for indices in data:
        usage.update(indices)
        metric.update(indices)
    return usage.compute(), metric.compute()


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(1, 40), books=st.integers(1, 4), grid=st.booleans(), seed=st.integers(0, 99)
)
def test_the_figures_equal_codebook_usage_exactly(size, books, grid, seed):
    ours, theirs = both(size, books, grid, batches(seed, size, books))
    assert theirs == ours  # every figure, per codebook too, to the last digit


@pytest.mark.parametrize("name", ["fsq", "rvq", "pq", "vq", "diveq", "fsp", "lfq"])
def test_for_quantizer_counts_a_preset_as_codebook_usage_does(name):
    torch.manual_seed(0)
    q = stabq.build_quantizer(name, 32).eval()
    indices = q(torch.randn(200, 32)).indices
    usage, metric = CodebookUsage.for_quantizer(q), CodebookUsageMetric.for_quantizer(q)
    usage.update(indices)
    metric.update(indices)
    assert metric.compute() == usage.compute()
    assert metric.compute()["grid"] == bool(getattr(q, "grid", False))
    metric.reset()
    assert metric.compute()["samples"] == 0


def test_bad_sizes_and_indices_are_refused():
    with pytest.raises(ConfigError, match="codebook_size=0, allowed is an integer >= 1"):
        CodebookUsageMetric(0)
    with pytest.raises(ConfigError, match=r"num_codebooks=1\.5, allowed"):
        CodebookUsageMetric(4, 1.5)
    metric = CodebookUsageMetric(4, 2)
    with pytest.raises(ShapeError, match="must end in num_codebooks=2"):
        metric.update(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ShapeError, match="index 4 out of range for codebook_size=4"):
        metric.update(torch.full((3, 2), 4))
    with pytest.raises(ShapeError, match="must be integers"):
        metric.update(torch.zeros(3, 2))


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        metric = CodebookUsageMetric(9, 2)
        for indices in batches(rank, 9, 2):  # each rank its own indices
            metric.update(indices)
        torch.save({k: v for k, v in metric.compute().items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_figures_of_every_rank_s_counts(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "figures")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(2, init, out), nprocs=2, join=True)
    union = CodebookUsage(9, 2, sync=False)
    for rank in range(2):
        for indices in batches(rank, 9, 2):
            union.update(indices)
    alone = CodebookUsage(9, 2, sync=False)
    for indices in batches(0, 9, 2):
        alone.update(indices)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got == union.compute()  # the same on every rank: the sum of both
    assert union.compute() != alone.compute()  # so the sync did something
