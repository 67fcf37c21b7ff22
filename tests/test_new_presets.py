"""The presets simvq, rfsq, lfq and bsq: through build_quantizer, the classifier, a few
training steps, the usage metrics and the collapse monitor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import stabq
from stabq import BottleneckClassifier, CodebookUsage, CollapseMonitor, TrainConfig

NEW = ["simvq", "rfsq", "lfq", "bsq"]
SHAPES = {  # (class, codebook_size, num_codebooks, levels the monitor reads)
    "simvq": (stabq.SimVQ, 1024, 1, None),
    "rfsq": (stabq.ResidualFSQ, 1000, 4, [8, 5, 5, 5]),
    "lfq": (stabq.LFQ, 2**16, 1, None),
    "bsq": (stabq.LFQ, 2**16, 1, None),
}


@pytest.mark.parametrize("name", NEW)
def test_the_preset_builds_what_the_table_says(name):
    cls, size, codebooks, levels = SHAPES[name]
    q = stabq.build_quantizer(name, 128)
    assert type(q) is cls and q.codebook_size == size and q.num_codebooks == codebooks
    assert getattr(q, "spherical", False) == (name == "bsq")
    monitor = CollapseMonitor(q)  # what the monitor infers from the module
    assert (monitor.codebook_size, monitor.num_codebooks, monitor.levels) == (
        size,
        codebooks,
        levels,
    )
    monitor.detach()


@pytest.mark.parametrize("name", NEW)
def test_usage_counts_the_preset_indices(name):
    torch.manual_seed(0)
    q = stabq.build_quantizer(name, 32).eval()
    usage = CodebookUsage.for_quantizer(q)
    indices = q(torch.randn(64, 32)).indices
    usage.update(indices)
    found = usage.compute()
    rows = indices.reshape(-1, q.num_codebooks)
    for c, per in enumerate(found["per_codebook"]):
        distinct = rows[:, c].unique().numel()
        assert per["usage"] == pytest.approx(distinct / q.codebook_size)
        assert per["fill"] == pytest.approx(distinct / min(64, q.codebook_size))
        assert per["dead_codes"] == (None if q.grid else q.codebook_size - distinct)
    assert found["samples"] == 64 and rows[:, 0].unique().numel() > 1


@pytest.mark.parametrize("name", [*NEW, "diveq", "rvq-diveq", "fsp", "ifsq", "gumbel-reinmax"])
def test_a_few_training_steps_stay_finite(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    model = BottleneckClassifier(input_dim=12, num_classes=2, quantizer=name, hidden=32)
    result = stabq.train(model, (x, y), config=TrainConfig(epochs=2, batch_size=32))
    for epoch in result.history:
        assert all(math.isfinite(v) for v in epoch.values() if isinstance(v, float))
    logits, out = model.eval()(torch.from_numpy(x))
    assert torch.isfinite(logits).all() and (out.indices >= 0).all()
