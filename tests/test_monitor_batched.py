"""CollapseMonitor computes its figures for many steps at once: the alerts, their steps and
messages, and the figures are those of judging each step as it comes (``check_every=1``,
which computes every step's figures at that step), and the guard's finiteness check is the
per-tensor one."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stabq import FSQ, LFQ, VectorQuantizer
from stabq.health import window
from stabq.health.grid_mechanisms import GridWatch
from stabq.monitor import CollapseMonitor
from stabq.training.best_epoch import finite_state

MECHANISMS = {"lag", "codes_blown_up", "blown_code_chosen", "loss_reduction", "fp16_overflow",
              "one_sided", "dims_correlated", "loss_nonfinite"}  # fmt: skip


class SummedVQ(nn.Module):
    """A VQ whose code table it scales up 3x a call, with a loss summed over the batch: its
    reduction and blown-up codes show; every 4th call hands back the input; a NaN loss at
    call 9."""

    codebook_size = 16

    def __init__(self):
        super().__init__()
        self.register_buffer("embed", torch.randn(16, 8))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.embed.mul_(3.0)  # in place: the monitor reads the codes at the step
        idx = (x @ self.embed.t()).argmax(-1)
        q = self.embed[idx] if self.calls % 4 else x
        loss = (x - q).pow(2).sum() * (math.nan if self.calls == 9 else 1.0)
        return x + (q - x), idx, loss


def feed(make, batches, **options):
    torch.manual_seed(0)
    module = make()
    monitor = CollapseMonitor(module, warn=False, window=6, min_samples=32, **options)
    seen = []
    for i, x in enumerate(batches):
        module(x)
        if i in (4, 10):  # read mid-way: the steps kept so far are judged then
            held = monitor.holding()
            seen.append((len(held), sorted(monitor._active & MECHANISMS)))
    return monitor, seen


def batches(n, rows, dim, grow=1.0):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows - (t % 3 == 2), dim, generator=g) * grow**t for t in range(n)]


def together_then_apart(n, rows, dim):
    """Every dimension one column (moving together) for ``n // 2`` steps, then apart; the
    first dimension far positive (one-sided) all along."""
    out = []
    for t, x in enumerate(batches(n, rows, dim)):
        if t < n // 2:
            x = x[:, :1].expand_as(x).clone()
        x[:, 0] = 10.0
        out.append(x)
    return out


CASES = {
    "summed vq": (SummedVQ, batches(16, 200, 8)),
    "stabq vq": (lambda: VectorQuantizer(8, codebook_size=32), batches(16, 40, 8, grow=3.0)),
    "lfq": (lambda: LFQ(6, bits=6), together_then_apart(16, 40, 6)),
    "fsq": (lambda: FSQ([5, 4, 3]), together_then_apart(20, 40, 3)),
    "fsq fp16": (lambda: FSQ([5, 4, 3], dim=8).half(), [b.half() for b in batches(8, 40, 8)]),
}


@pytest.mark.parametrize("name", CASES)
def test_alerts_are_those_of_judging_every_step_as_it_comes(name):
    make, xs = CASES[name]
    each, each_seen = feed(make, xs, check_every=1)
    kept, kept_seen = feed(make, xs, check_every=50)
    ours = [(a.kind, a.step, a.message) for a in kept.alerts if a.kind in MECHANISMS]
    theirs = [(a.kind, a.step, a.message) for a in each.alerts if a.kind in MECHANISMS]
    assert ours == theirs
    assert [s[1] for s in kept_seen] == [s[1] for s in each_seen]
    assert kept.step == each.step == len(xs)
    report, expected = kept.report(), each.report()
    for key in ("samples", "codes_used", "perplexity", "saturation"):  # over the window
        assert report[key] == expected[key], key


def test_steps_holding_many_bytes_are_computed_before_the_check(monkeypatch):
    """Large batches: the kept steps are computed once they hold ``PENDING_BYTES``, not
    held until the check, and judged as every step alone."""
    make, xs = CASES["stabq vq"]
    each, _ = feed(make, xs, check_every=1)
    held = []
    real = window.window_full

    def full(count, size):
        held.append(count)
        return real(count, size)

    monkeypatch.setattr(window, "PENDING_BYTES", 10 * xs[0].numel() * 4)
    monkeypatch.setattr("stabq.health.monitor.window_full", full)
    kept, _ = feed(make, xs, check_every=50)
    assert 1 < max(held) < 5  # some steps wait; a few steps' rows reach the bound
    ours = [(a.kind, a.step, a.message) for a in kept.alerts if a.kind in MECHANISMS]
    assert ours == [(a.kind, a.step, a.message) for a in each.alerts if a.kind in MECHANISMS]
    assert ours  # the case raises a mechanism's alert


RAISED = {
    "summed vq": {"loss_reduction", "loss_nonfinite", "codes_blown_up", "blown_code_chosen"},
    "stabq vq": {"lag"},
    "lfq": {"one_sided", "dims_correlated"},
    "fsq": {"one_sided", "dims_correlated"},
}


@pytest.mark.parametrize("name", RAISED)
def test_each_case_raises_what_it_is_built_to(name):
    make, xs = CASES[name]
    assert {a.kind for a in feed(make, xs, check_every=50)[0].alerts} >= RAISED[name]


@settings(max_examples=20, deadline=None)
@given(steps=st.integers(1, 5), rows=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_grid_fields_of_many_steps_are_each_steps_fields(steps, rows, seed):
    levels = [4, 3, 2]
    watch = GridWatch(levels, window=10, min_samples=1)
    g = torch.Generator().manual_seed(seed)
    flat = torch.randint(-1, 24 + 2, (steps, rows, 2), generator=g)  # some invalid
    together = watch.batch_fields(flat)
    for s in range(steps):
        alone = watch.fields(flat[s], 2)
        assert torch.equal(together[s, :-1], alone[:-1])  # counts: exact
        assert torch.allclose(together[s, -1:], alone[-1:], rtol=1e-5, equal_nan=True)


def reference_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(
    where=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 999)), max_size=3),
    value=st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -0.0]),
    half=st.booleans(),
)
def test_finite_state_is_every_value_finite(where, value, half):
    model = nn.Sequential(nn.Linear(30, 30), nn.LayerNorm(30), nn.Linear(30, 3))
    model.register_buffer("empty", torch.zeros(0))
    model.register_buffer("count", torch.tensor(7))  # not floating point: not judged
    if half:
        model[1].half()
    tensors = [p.data for p in model.parameters()]
    with torch.no_grad():
        for which, at in where:
            t = tensors[which].view(-1)
            t[at % t.numel()] = value
    assert finite_state(model) == reference_finite(model)


def test_finite_state_without_foreach_max_is_the_same(monkeypatch):
    """On a torch without ``_foreach_max`` (before 2.4) the per-tensor maxima decide."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    monkeypatch.delattr(torch, "_foreach_max", raising=False)
    assert finite_state(model)
    with torch.no_grad():
        model[1].bias[0] = math.nan
    assert not finite_state(model) and not reference_finite(model)
