"""benchmarks/quantizers.py: every row builds both sides and runs both ways (tiny sizes)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import quantizers as bench


@pytest.mark.parametrize("row", bench.ROWS, ids=lambda row: row.key)
def test_each_row_steps_both_sides_both_ways(row):
    """On 64 inputs each side of a row takes a fixed-gradient step and a user-style step;
    the input's gradient is finite, and only PQ, Gumbel, iFSQ and ReinMax lack a peer."""
    small = dataclasses.replace(row, inputs=64)
    torch.manual_seed(0)
    x = torch.randn(small.inputs, small.dim)
    for side in ("stabq", "peer"):
        module = bench.build(small, side, "cpu")
        if module is None:
            assert side == "peer" and row.key in ("pq", "gumbel", "ifsq", "gumbel-reinmax"), row
            continue
        for make in bench.MODES.values():
            leaf = x.clone().requires_grad_()
            make(module, leaf, side)()
            assert leaf.grad is None  # the step differentiates its own copy of x
        out = module(x[None] if side == "peer" else x)
        assert out[0].shape[-2:] == x.shape


def test_aux_loss_is_summed_and_absent_for_two_entry_outputs():
    assert bench.aux_loss((torch.ones(3), torch.zeros(3, dtype=torch.long))) is None
    assert bench.aux_loss((torch.ones(3), torch.zeros(3), torch.ones(1, 4))).item() == 4.0
    assert bench.aux_loss((torch.ones(3), torch.zeros(3), None)) is None


@pytest.mark.parametrize("key", ["gumbel", "gumbel-reinmax"])
def test_a_gumbel_rows_floor_is_its_products_and_one_product_is_beside_it(key):
    row = next(r for r in bench.ROWS if r.key == key)
    result = bench.time_row(dataclasses.replace(row, inputs=64, codes=16, dim=8), 1, "cpu")
    for floor in ("floor", "product"):
        assert result[f"{floor}_ratio"] == result["stabq_ms"] / result[f"{floor}_ms"]
