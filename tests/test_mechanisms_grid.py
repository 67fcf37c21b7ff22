"""CollapseMonitor names the failures of grids and of SimVQ's map, and no lag where the
codes ignore the input's scale.

Each mechanism is driven by a constructed module state and input whose figures are
known exactly (bits held to one sign, code dimensions equal, a diagonal map), and
checked silent on a healthy counterpart; no training outcome is asserted.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from stabq import FSP, FSQ, LFQ, GumbelQuantizer, SimVQ, VectorQuantizer
from stabq.health.grid_mechanisms import (
    CORRELATION_STEPS,
    MAP_EVERY,
    _mean_abs_correlation,
    grid_levels,
    map_fields,
    normalises,
)
from stabq.monitor import CollapseMonitor

vqp = pytest.importorskip("vector_quantize_pytorch")

GRID_KINDS = {"one_sided", "dims_correlated", "map_singular"}
MECHANISMS = {"lag", "codes_blown_up", "blown_code_chosen", "loss_reduction", "fp16_overflow"}


def kinds(monitor: CollapseMonitor, among: set[str]) -> list[str]:
    return [a.kind for a in monitor.alerts if a.kind in among]


def balanced_signs(rows: int, dims: int) -> torch.Tensor:
    """``(rows, dims)`` of +-1: column j flips every 2**j rows, so each bit is half
    positive and no two columns correlate (rows a multiple of 2**dims)."""
    r = torch.arange(rows)[:, None]
    return torch.where((r >> torch.arange(dims)) & 1 == 1, 1.0, -1.0)


# -- LFQ: bits that keep one sign -------------------------------------------------------------


def test_an_lfq_whose_projection_holds_3_of_8_bits_positive_is_named():
    q = LFQ(16, bits=8)
    with torch.no_grad():  # outputs 0, 1, 2 are +100 plus a small term: always positive
        q.project_in.weight.copy_(torch.eye(8, 16))
        q.project_in.bias.copy_(torch.tensor([100.0] * 3 + [0.0] * 5))
    monitor = CollapseMonitor(q, warn=False, min_samples=512)
    x = torch.zeros(256, 16)
    x[:, :8] = balanced_signs(256, 8)
    for _ in range(2):
        q(x)
    (alert,) = [a for a in monitor.alerts if a.kind == "one_sided"]
    assert alert.step == 2 and alert.value == 3.0
    assert alert.message == "3 of 8 bits keep one sign for 100% of inputs over the last 2 steps"
    assert kinds(monitor, MECHANISMS) == []  # an LFQ's codes are a grid: no lag, no blow-up


def test_the_share_quoted_is_the_least_one_sided_bit_over_the_window():
    q = LFQ(8, bits=8)  # no projection: the signs of the input are the bits
    monitor = CollapseMonitor(q, warn=False, min_samples=256)
    x = balanced_signs(256, 8)
    x[:, :2] = 1.0  # bits 0 and 1 always positive
    x[:, 2] = torch.where(torch.arange(256) < 246, 1.0, -1.0)  # bit 2: 246 of 256 = 96.09%
    q(x)
    (alert,) = [a for a in monitor.alerts if a.kind == "one_sided"]
    assert alert.message == "3 of 8 bits keep one sign for 96% of inputs over the last 1 step"


def test_a_bit_at_94_percent_and_a_short_window_raise_nothing():
    q = LFQ(8, bits=8)
    monitor = CollapseMonitor(q, warn=False, min_samples=512)
    x = balanced_signs(256, 8)
    x[:, 0] = torch.where(torch.arange(256) < 241, 1.0, -1.0)  # 241 / 256 = 94.1%
    q(x)  # 256 rows: fewer than min_samples, not judged
    x[:, 1] = 1.0
    q(x)  # bit 1 now one-sided in half the window only: 75%
    assert kinds(monitor, GRID_KINDS) == []
    assert monitor.report()["samples"] == 512


def test_a_bit_that_returns_to_both_signs_clears_the_alert_and_it_can_fire_again():
    q = LFQ(8, bits=8)
    monitor = CollapseMonitor(q, warn=False, window=2, min_samples=256)
    stuck, healthy = balanced_signs(256, 8), balanced_signs(256, 8)
    stuck[:, 5] = -1.0
    for x in (stuck, healthy, healthy, stuck, stuck):
        q(x)
    assert [(a.kind, a.step) for a in monitor.alerts if a.kind == "one_sided"] == [
        ("one_sided", 1),
        ("one_sided", 5),  # step 4's window holds one stuck and one healthy step: 50%
    ]


def test_the_peer_lfq_is_read_as_bits_too():
    torch.manual_seed(0)
    q = vqp.LFQ(dim=8, codebook_size=2**8, entropy_loss_weight=0.1)
    monitor = CollapseMonitor(q, warn=False, min_samples=256)
    x = balanced_signs(256, 8)
    x[:, 3] = 1.0
    q(x[:, None, :])  # (batch, seq, dim)
    (alert,) = [a for a in monitor.alerts if a.kind == "one_sided"]
    assert alert.message.startswith("1 of 8 bits keep one sign for 100% of inputs")


# -- code dimensions that move together -------------------------------------------------------


def test_an_fsq_fed_equal_dimensions_is_named_with_correlation_1():
    q = FSQ([5, 5, 5, 5], dim=4)
    monitor = CollapseMonitor(q, warn=False, window=CORRELATION_STEPS)  # judged once full
    t = torch.linspace(-2, 2, 64)[:, None]
    for _ in range(CORRELATION_STEPS):
        q(t.expand(64, 4))
    (alert,) = [a for a in monitor.alerts if a.kind == "dims_correlated"]
    assert alert.step == CORRELATION_STEPS and alert.value == pytest.approx(1.0, abs=1e-6)
    assert alert.message == (
        "code dimensions move together: mean |correlation| 1.00 across the batch over the "
        "last 20 steps: few cells are reached"
    )


def test_the_correlation_is_the_mean_of_the_last_batches():
    q = FSQ([5, 5, 5, 5], dim=4)
    monitor = CollapseMonitor(q, warn=False, window=4)  # the last min(window, 20) batches
    together = torch.linspace(-2, 2, 64)[:, None].expand(64, 4)
    spread = torch.atanh(torch.cartesian_prod(*[torch.linspace(-0.8, 0.8, 5)] * 4) / 2)[::5]
    for x in [together, spread, spread, together, together]:
        q(x)  # means 1 (too few batches), 0.5, 0.5 (steps 4 and 5)
    assert kinds(monitor, GRID_KINDS) == []
    q(together)  # 3 of the last 4: 0.75
    (alert,) = monitor.alerts
    assert alert.step == 6 and alert.value == pytest.approx(0.75, abs=1e-6)
    assert "0.75 across the batch over the last 4 steps" in alert.message


def test_an_fsq_whose_cells_are_all_reached_once_raises_nothing():
    q = FSQ([5, 5, 5, 5], dim=4)  # one input in each of the 625 cells: correlation 0
    monitor = CollapseMonitor(q, warn=False, min_samples=625)
    grid = torch.cartesian_prod(*[torch.linspace(-1.6, 1.6, 5)] * 4)
    q(torch.atanh(grid / 2.0).clamp(-3, 3))
    assert monitor.report()["codes_used"] == 625
    assert kinds(monitor, GRID_KINDS) == []


def test_the_mean_absolute_correlation_matches_numpy():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -0.7], [0.0, 0.0, 1.0]])
    level = (torch.randn(200, 2, 3, generator=g) @ mix).round().clamp(-2, 2)
    level[:, 1, 2] = 1.0  # constant in the batch: left out of codebook 1's pairs
    pairs = []
    for c, used in ((0, [0, 1, 2]), (1, [0, 1])):
        corr = np.corrcoef(level[:, c, used].numpy().T)
        pairs += [abs(corr[i, j]) for i in range(len(used)) for j in range(i + 1, len(used))]
    found = float(_mean_abs_correlation(level))
    assert found == pytest.approx(np.mean(pairs), rel=1e-5)
    assert torch.isnan(_mean_abs_correlation(level[:15]))  # too few rows to judge
    # rows weighted 0 (invalid indices) count as absent
    weight = (torch.arange(400) < 200).float()
    padded = torch.cat([level, torch.randn(200, 2, 3, generator=g).round()])
    assert float(_mean_abs_correlation(padded, weight)) == pytest.approx(found, rel=1e-5)


def test_rows_whose_indices_are_negative_are_not_counted():
    q = LFQ(8, bits=8)
    monitor = CollapseMonitor(q, warn=False, min_samples=256)
    watch = monitor.mechanisms.grid
    indices = torch.tensor([[3], [-1], [3], [1]])  # -1: a row quantization left out
    counts = watch.fields(indices, 1)[:-1].view(8, 2)
    assert counts.sum(1).tolist() == [3.0] * 8
    assert counts[:2].tolist() == [[0.0, 3.0], [1.0, 2.0]]  # bits 0 and 1 of 3, 3, 1


def test_dimensions_of_different_residual_layers_are_not_compared():
    from stabq.quantizers.rfsq import ResidualFSQ

    q = ResidualFSQ([5, 5], dim=2, num_quantizers=2)
    monitor = CollapseMonitor(q, warn=False, min_samples=10**6)
    grid = torch.cartesian_prod(*[torch.linspace(-0.9, 0.9, 16)] * 2)
    q(grid)
    assert kinds(monitor, GRID_KINDS) == []


def test_an_fsp_dimension_pinned_to_its_top_bin_is_one_sided():
    q = FSP([8, 8, 8, 8])
    monitor = CollapseMonitor(q, warn=False, min_samples=256)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0)) * 0.3
    x[:, 1] = 50.0  # (tanh + 1) / 2 = 1: the top bin for every input
    q.eval()(x)
    (alert,) = [a for a in monitor.alerts if a.kind == "one_sided"]
    assert alert.message == (
        "1 of 4 code dimensions keep one end level for 100% of inputs over the last 1 step"
    )


def test_an_fsp_near_its_middle_bins_at_the_start_is_not_one_sided():
    q = FSP([8, 8, 8, 8])  # small inputs sit in the two middle bins, not at an end
    monitor = CollapseMonitor(q, warn=False, min_samples=256)
    q(torch.randn(256, 4, generator=torch.Generator().manual_seed(0)) * 0.01)
    assert "one_sided" not in kinds(monitor, GRID_KINDS)


# -- SimVQ's map --------------------------------------------------------------------------------


def near_singular() -> torch.Tensor:
    return torch.diag(torch.tensor([62.0, 30.0] + [0.002] * 14))


def test_a_collapsed_simvq_whose_map_spans_two_directions_is_named_with_the_collapse():
    q = SimVQ(16, codebook_size=64, identity_transform=True)
    monitor = CollapseMonitor(q, warn=False, check_every=MAP_EVERY, min_samples=16)
    x = torch.zeros(32, 16)  # every input alike: one code takes them all
    q(x)  # step 1 reads W = I
    with torch.no_grad():
        q.transform.weight.copy_(near_singular())
    for _ in range(MAP_EVERY - 1):
        q(x)  # step 50: collapse; the map read at step 1 is the identity
    assert kinds(monitor, {"collapse", *GRID_KINDS}) == ["collapse"]
    for _ in range(MAP_EVERY):
        q(x)  # step 51 reads the map, step 100 judges it with the collapse
    (alert,) = [a for a in monitor.alerts if a.kind == "map_singular"]
    assert alert.step == 2 * MAP_EVERY and alert.value == 2.0
    assert alert.message == (
        "the codebook's map W is near-singular (singular values 62 to 0.002): 2 of 16 "
        "directions carry 99% of its energy, so the codes span few directions"
    )


def test_a_near_singular_map_without_a_collapse_is_not_named():
    # the simvq preset's W concentrates too under a high learning rate (4 of 128 directions
    # carried 99% on mnist1d) while its codes stayed in use: alone it names no failure
    q = SimVQ(16, codebook_size=64)
    with torch.no_grad():
        q.transform.weight.copy_(near_singular())
    monitor = CollapseMonitor(q, warn=False, check_every=10, min_samples=16)
    for t in range(20):
        q(torch.randn(64, 16, generator=torch.Generator().manual_seed(t)))
    assert monitor.mechanisms.map_verdict[1] is True
    assert kinds(monitor, {"collapse", *GRID_KINDS}) == []


@pytest.mark.parametrize("identity", [True, False])
def test_the_identity_and_nn_linears_random_start_are_not_near_singular(identity):
    torch.manual_seed(0)
    q = SimVQ(16, codebook_size=64, identity_transform=identity)
    monitor = CollapseMonitor(q, warn=False, check_every=1, min_samples=16)
    q(torch.zeros(32, 16))  # a collapse: the map is judged
    assert kinds(monitor, {"collapse", *GRID_KINDS}) == ["collapse"]
    k = map_fields(q.transform.weight.detach())[2].item()
    assert k > 8 and (k == 16) == identity  # the random start: ~3/4 of the directions


def test_the_peer_simvq_map_is_read():
    torch.manual_seed(0)
    q = vqp.SimVQ(dim=16, codebook_size=64)
    with torch.no_grad():
        q.code_transform.weight.copy_(near_singular())
    monitor = CollapseMonitor(q, warn=False, check_every=1, min_samples=16)
    q(torch.zeros(4, 8, 16))
    assert kinds(monitor, {"collapse", *GRID_KINDS}) == ["collapse", "map_singular"]


def test_map_fields_against_the_definition():
    w = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.1]))  # energies 9, 4, 1, 0.01 of 14.01
    assert map_fields(w).tolist() == pytest.approx([3.0, 0.1, 3.0])  # 14 / 14.01 > 99%


# -- no lag where the codes ignore the input's scale ---------------------------------------------


NORMALISING = {
    "simvq pre_norm": lambda: SimVQ(16, codebook_size=64, pre_norm=True),
    "gumbel pre_norm": lambda: GumbelQuantizer(16, codebook_size=64, pre_norm=True),
    "cosine vq": lambda: VectorQuantizer(16, codebook_size=64, cosine=True),
    "bsq": lambda: LFQ(16, bits=16, spherical=True),
    "lfq pre_norm": lambda: LFQ(16, bits=16, pre_norm=True),
    "peer cosine vq": lambda: vqp.VectorQuantize(dim=16, codebook_size=64, use_cosine_sim=True),
}


def run_scaled(q: nn.Module, factors: list[float]) -> CollapseMonitor:
    monitor = CollapseMonitor(q, warn=False, window=10)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(0))
    for f in factors:
        q(x * f)
    return monitor


GROW = [1.0, 1.0, 1.0, 1000.0, 1000.0]  # the input norm grows 1000x at step 4
SHRINK = [1.0, 1e-2, 1e-4, 1e-4]


@pytest.mark.parametrize("name", NORMALISING)
def test_a_normalising_quantizer_fed_growing_or_shrinking_inputs_raises_no_mechanism(name):
    torch.manual_seed(0)
    q = NORMALISING[name]()
    assert normalises(q)
    assert kinds(run_scaled(q, GROW), MECHANISMS) == []
    assert kinds(run_scaled(q, SHRINK), MECHANISMS) == []


@pytest.mark.parametrize("peer", [False, True])
def test_a_plain_vq_ema_fed_the_same_growing_inputs_still_lags(peer):
    torch.manual_seed(0)
    if peer:
        q = vqp.VectorQuantize(dim=16, codebook_size=64, decay=0.99)
    else:
        q = VectorQuantizer(16, codebook_size=64)
    assert not normalises(q)
    monitor = run_scaled(q, GROW)
    lag = next(a for a in monitor.alerts if a.kind == "lag")
    assert lag.step == 4 and lag.message.startswith("encoder output norm grew 1000x in 3 steps")
    assert lag.message.endswith("the codebook lags the encoder")


def test_grid_levels_read_levels_and_powers_of_two():
    assert grid_levels(FSQ([8, 5, 5]), 200, [8, 5, 5], True) == [8, 5, 5]
    assert grid_levels(LFQ(8, bits=3, num_codebooks=2), 8, None, True) == [2, 2, 2]
    assert grid_levels(VectorQuantizer(8, 64), 64, None, False) is None


# -- checkpoints ---------------------------------------------------------------------------------


def test_a_restored_monitor_keeps_the_grids_window():
    def feed(q, monitor, steps):
        for t in steps:
            x = balanced_signs(256, 8)
            x[:, 0] = 1.0 if t >= 2 else x[:, 0]
            q(x)

    a, b = LFQ(8, bits=8), LFQ(8, bits=8)
    ma = CollapseMonitor(a, warn=False, window=4, min_samples=512)
    mb = CollapseMonitor(b, warn=False, window=4, min_samples=512)
    feed(a, ma, range(3))
    feed(b, mb, range(3))
    mb.load_state_dict(json.loads(json.dumps(ma.state_dict())))
    feed(a, ma, range(3, 8))
    feed(b, mb, range(3, 8))
    assert ma.alerts == mb.alerts and kinds(ma, GRID_KINDS) == ["one_sided"]
