"""The explode preset: the baseline options' math, the explosion, the presets that hold,
and the guards that stop it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from stabq.compare import METHODS, _train_test, compare, run_one
from stabq.errors import ConfigError
from stabq.quantizers.codebook import Codebook, laplace_smooth
from stabq.quantizers.vq import VectorQuantizer
from stabq.scenarios import (
    EXPLODE_CONFIG,
    GUARDED,
    SCENARIOS,
    STABQ_PRESETS,
    explode_verdict,
    exploded,
)
from stabq.training import TrainConfig
from stabq.training.loop import build_optimizer


@pytest.mark.parametrize("decay", [0.99, None])
def test_sum_reduction_is_the_batch_sum_and_mean_is_unchanged(decay):
    torch.manual_seed(0)
    x = torch.randn(6, 5, 8)
    losses, grads = {}, {}
    for reduction in ("mean", "sum"):
        torch.manual_seed(1)
        vq = VectorQuantizer(8, 16, decay=decay, commitment_reduction=reduction)
        codes = vq.codes.clone()
        xr = x.clone().requires_grad_(True)
        _, idx, loss = vq(xr)
        loss.backward()
        losses[reduction], grads[reduction] = loss, xr.grad
        q = codes[idx]
        expected = 0.25 * ((x - q) ** 2).sum()
        if decay is None:  # a learned codebook adds |sg(z) - c|^2, reduced alike
            expected = expected * 5  # 0.25 + 1
        assert torch.allclose(loss, expected / (x.numel() if reduction == "mean" else 1))
    assert torch.allclose(losses["sum"], losses["mean"] * x.numel(), rtol=1e-5)
    assert torch.allclose(grads["sum"], grads["mean"] * x.numel(), rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    default = VectorQuantizer(8, 16, decay=decay)(x)[2]
    assert torch.equal(default, losses["mean"].detach())  # the default, bitwise


def test_zero_cluster_sizes_blow_never_used_codes_up_by_the_laplace_factor():
    torch.manual_seed(0)
    k, d, decay, eps = 64, 16, 0.99, 1e-5
    book = Codebook(k, d, decay=decay, cluster_size_init="zeros")
    start = book.embed.clone()
    x = torch.randn(1, 128, d) * 0.1  # near the origin: few codes are chosen
    _, idx = book(x)
    unused = torch.ones(k, dtype=torch.bool)
    unused[idx[0]] = False
    assert unused.sum() > k // 2
    counts = torch.bincount(idx[0], minlength=k).float()
    cluster = (1 - decay) * counts  # N_k after one update from zero
    total = cluster.sum()
    smoothed = (cluster + eps) / (total + k * eps) * total  # brute force, not laplace_smooth
    predicted = decay * start[0, unused] / smoothed[unused, None]
    assert torch.allclose(book.embed[0, unused], predicted, rtol=1e-5)
    ratio = book.embed[0, unused].norm(dim=-1) / start[0, unused].norm(dim=-1)
    assert torch.allclose(ratio, torch.full_like(ratio, decay * (total + k * eps) / (eps * total)))
    assert float(ratio.min()) > 5e4  # ~1e5 x too large (Sonnet #272)
    ones = Codebook(k, d, decay=decay)  # the default keeps them in place
    ones.embed.copy_(start)
    ones.embed_sum.copy_(start)
    ones(x)
    assert torch.allclose(ones.embed[0, unused], start[0, unused] * decay / laplace_smooth(
        ones.cluster_size, eps)[0, unused, None])  # fmt: skip
    assert float(ones.embed[0, unused].norm(dim=-1).max()) < 2 * float(start.norm(dim=-1).max())


def test_bad_options_are_one_line_config_errors():
    for make, text in [
        (lambda: VectorQuantizer(8, 16, commitment_reduction="max"), "commitment_reduction='max'"),
        (lambda: VectorQuantizer(8, 16, cluster_size_init="rand"), "cluster_size_init='rand'"),
        (lambda: TrainConfig(optimizer="adam"), "optimizer='adam', allowed: adamw, sgd"),
        (lambda: TrainConfig(momentum=1.0), "momentum=1.0"),
        (lambda: TrainConfig(grad_clip=0.0), "grad_clip=0.0"),
    ]:
        with pytest.raises(ConfigError, match=r"^[^\n]*$") as err:
            make()
        assert text in str(err.value)
    with pytest.raises(ConfigError, match="--preset 'boom'"):
        compare("synthetic:16", ["fsq"], seeds=1, epochs=1, preset="boom")


def test_sgd_is_built_with_its_momentum_and_no_clipping_is_allowed():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(params, TrainConfig(optimizer="sgd", momentum=0.5, lr=0.1))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.5
    assert isinstance(build_optimizer(params, TrainConfig()), torch.optim.AdamW)
    assert TrainConfig(grad_clip=None).grad_clip is None


EXPLOSION = """
import json, sys
from stabq.compare import METHODS, _train_test, run_one
from stabq.data import from_arrays
from stabq.scenarios import EXPLODE_CONFIG, SCENARIOS
from stabq.training import TrainConfig
tr, te = _train_test("mnist1d", None)
tr = from_arrays(tr.x[:1024], tr.y[:1024])  # 7 steps of 128 rows: it blows up within them
config = TrainConfig(epochs=1, progress=False, **EXPLODE_CONFIG)
print(json.dumps({s.name: run_one(METHODS[s.baseline], 0, tr, te, config)["history"][0]["max_loss"]
                  for s in SCENARIOS}))
"""


@pytest.mark.outcome  # the verdict depends on how training ends
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_every_scenario_blows_the_baseline_up_on_every_kernel_path(capability):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run(
        [sys.executable, "-c", EXPLOSION], env=env, capture_output=True, text=True, check=True
    )
    largest = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(largest) == {s.name for s in SCENARIOS}
    assert all(exploded(v) for v in largest.values()), largest  # within the first epoch


@pytest.fixture(scope="module")
def mnist1d():
    return _train_test("mnist1d", None)


@pytest.mark.outcome
def test_stabq_presets_hold_under_the_scenarios_optimiser(mnist1d):
    config = TrainConfig(epochs=1, progress=False, **EXPLODE_CONFIG)
    for name in [n for n in STABQ_PRESETS if n != "vq-ema"]:  # vq-ema: the baseline
        record = run_one(METHODS[name], 0, *mnist1d, config)
        assert not record["diverged"] and record["max_loss"] < 100, (name, record["max_loss"])


@pytest.mark.outcome
def test_with_guards_on_each_baseline_is_rescued_or_stopped_in_one_line(mnist1d):
    config = TrainConfig(epochs=3, progress=False, **{**EXPLODE_CONFIG, **GUARDED})
    for scenario in SCENARIOS:
        record = run_one(METHODS[scenario.baseline], 0, *mnist1d, config)
        if record["diverged"]:
            assert "\n" not in record["error"] and "training diverged" in record["error"]
        else:  # rescued: the guard undid steps and the model is finite
            assert record["guard_events"] > 0 and math.isfinite(record["test_loss"])


def test_the_preset_runs_each_scenario_as_a_comparison_then_guarded():
    result = compare("synthetic:16", ["fsq"], seeds=1, epochs=1, preset="explode", progress=False)
    sections = [(r["scenario"], r["guards"], r["method"]) for r in result.rows]
    expected = []
    for s in SCENARIOS:
        expected += [
            (s.name, False, s.baseline),
            (s.name, False, "fsq"),
            (s.name, True, s.baseline),
        ]
    assert sections == expected
    fsq = [r for r in result.records if r["method"] == "fsq"]
    assert fsq[0]["history"] == fsq[1]["history"]  # the same options: one run, shared
    assert result.settings["optimizer"] == "sgd" and result.settings["grad_clip"] is None
    assert result.verdict.count("\n") == len(SCENARIOS) - 1
    assert all(
        line.startswith(s.name)
        for line, s in zip(result.verdict.splitlines(), SCENARIOS, strict=True)
    )


def test_the_verdict_counts_healthy_presets_and_names_the_others():
    """Per scenario: the baseline's largest loss, presets under the loss bound, and which
    presets ended unhealthy, by verdict; a guarded baseline's stops and rescues."""

    def row(method, guards, max_loss, verdict, diverged=0, rescued=0):
        return {"scenario": SCENARIOS[0].name, "guards": guards, "method": method,
                "max_loss": max_loss, "verdict": verdict, "diverged": diverged,
                "rescued": rescued, "seeds": 3}  # fmt: skip

    base = SCENARIOS[0].baseline
    rows = [
        row(base, False, float("inf"), "diverged", diverged=3),
        row("fsq", False, 2.3, "ok"),
        row("vq", False, 2.4, "rescued"),
        row("lfq", False, 3.2, "under-used"),
        row("bsq", False, 150.0, "collapsed"),
        row(base, True, 2780.0, "diverged", diverged=2, rescued=1),
    ]
    line = explode_verdict(rows)
    assert line == (
        f"{SCENARIOS[0].name}: {base} largest loss inf (exploded, 3/3 diverged); "
        "stabq presets under 100: 3/4 (largest 150), ended healthy: 2/4 "
        "(lfq under-used, bsq collapsed); guards on: 1 rescued, 2 stopped, of 3."
    )
