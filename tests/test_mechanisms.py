"""CollapseMonitor names the mechanism while it happens, before the loss passes 1e6.

Each mechanism is driven by the module where it shows: a VQ-EMA as tutorials write
it (cluster sizes from zero, Laplace smoothing, a ``randn`` codebook, optionally a
summed commitment), or vector-quantize-pytorch's VectorQuantize. Healthy runs of
the same modules, and stabq's presets in its trainer, raise none of these alerts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stabq import BottleneckClassifier, TrainConfig, train
from stabq.data import from_arrays
from stabq.mechanisms import Mechanisms, sci
from stabq.monitor import CollapseMonitor

vqp = pytest.importorskip("vector_quantize_pytorch")

MECHANISMS = {"lag", "codes_blown_up", "blown_code_chosen", "loss_reduction", "fp16_overflow"}


class TutorialVQEMA(nn.Module):
    """VQ-EMA as tutorials write it; ``reduction="sum"`` and ``zero_sizes`` reproduce failures."""

    def __init__(self, dim, size, *, reduction="mean", zero_sizes=False, beta=0.25, eps=1e-5):
        super().__init__()
        self.codebook_size, self.reduction, self.beta, self.eps = size, reduction, beta, eps
        embed = torch.randn(size, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("cluster_size", (torch.zeros if zero_sizes else torch.ones)(size))

    def forward(self, x):
        e = self.embed
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ e.t() + e.pow(2).sum(1)
        idx = dist.argmin(1)
        q = e[idx]
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(idx, self.codebook_size).to(x.dtype)
                self.cluster_size.mul_(0.99).add_(onehot.sum(0), alpha=0.01)
                self.embed_sum.mul_(0.99).add_(onehot.t() @ x, alpha=0.01)
                n = self.cluster_size.sum()
                smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
                self.embed.copy_(self.embed_sum / smoothed.unsqueeze(1))
        diff = (x - q.detach()).pow(2)
        loss = self.beta * (diff.sum() if self.reduction == "sum" else diff.mean())
        return x + (q - x).detach(), idx, loss


def train_mlp(quantizer, *, sgd: bool, lr: float, steps: int, seed: int = 0):
    """MLP encoder (40-256-256-128) -> quantizer -> linear head on 10 Gaussian classes.

    Returns the monitor and the first forward call (1-based) whose loss is >= 1e6 or
    not finite (None if none).
    """
    torch.manual_seed(seed)
    means = torch.randn(10, 40)
    encoder = nn.Sequential(
        nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128)
    )
    head = nn.Linear(128, 10)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr, momentum=0.9) if sgd else torch.optim.Adam(params, lr)
    monitor, passed = CollapseMonitor(quantizer, warn=False), None
    for t in range(1, steps + 1):
        y = torch.randint(0, 10, (128,))
        q, _, aux = quantizer(encoder(means[y] + torch.randn(128, 40)))
        ce = F.cross_entropy(head(q), y)
        monitor.observe(task_loss=ce)
        loss = ce + aux.sum()
        if not float(loss.detach()) < 1e6:
            passed = passed or t
            if not math.isfinite(float(loss.detach())):
                break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return monitor, passed


def first(monitor: CollapseMonitor, kind: str):
    return next((a for a in monitor.alerts if a.kind == kind), None)


def new_alerts(monitor: CollapseMonitor) -> list:
    return [a for a in monitor.alerts if a.kind in MECHANISMS]


# -- the user's explosion -------------------------------------------------------------------


@pytest.mark.outcome  # the verdict depends on how training ends
def test_the_users_explosion_is_named_before_the_loss_passes_1e6():
    # zero-initialised cluster sizes, summed commitment, SGD momentum 0.9 at lr 1e-2
    vq = TutorialVQEMA(128, 512, reduction="sum", zero_sizes=True)
    monitor, passed = train_mlp(vq, sgd=True, lr=1e-2, steps=20)
    assert passed is not None and passed <= 5  # measured: forward 2 (1.5e6), then 3e20, inf
    blown, summed = first(monitor, "codes_blown_up"), first(monitor, "loss_reduction")
    assert blown is not None and blown.step < passed
    assert blown.message.endswith("x the input norm: never-used codes have blown up")
    assert blown.message.startswith("codes of norm ") and blown.value > 1e5
    assert summed is not None and summed.step < passed
    # a mean over 128 x 128 values is 1/16384 of their sum: 0.25 x 16384 = 4096
    assert summed.message.startswith("the commitment loss is 4e3 x the mean squared distance")
    assert summed.message.endswith(
        "check its reduction (a sum over the batch where a mean is meant)"
    )


@pytest.mark.outcome
def test_a_summed_commitment_alone_runs_the_encoder_away_from_a_lagging_codebook():
    vq = TutorialVQEMA(128, 512, reduction="sum")  # cluster sizes from ones: no blown codes
    monitor, passed = train_mlp(vq, sgd=True, lr=1e-2, steps=30)
    assert passed is not None  # measured: forward 2
    lag, summed = first(monitor, "lag"), first(monitor, "loss_reduction")
    assert summed is not None and summed.step == 1 and summed.step < passed
    # the lag is named in the forward that returns the runaway loss, before it is returned
    assert lag is not None and lag.step <= passed and lag.value >= 100
    assert "x while the codes moved" not in lag.message
    assert lag.message.startswith("encoder output norm grew ")
    assert lag.message.endswith("x: the codebook lags the encoder")
    assert first(monitor, "codes_blown_up") is None


@pytest.mark.parametrize("sgd, lr", [(True, 1e-2), (False, 1e-3)])
def test_the_mean_reduced_module_with_cluster_sizes_from_ones_raises_none(sgd, lr):
    monitor, passed = train_mlp(TutorialVQEMA(128, 512), sgd=sgd, lr=lr, steps=150)
    assert passed is None and new_alerts(monitor) == []


# -- blown-up never-used codes --------------------------------------------------------------


def test_zero_initialised_cluster_sizes_are_named_under_adam_too():
    # the "same module under Adam": no explosion, a collapse; the cause is named
    monitor, passed = train_mlp(
        TutorialVQEMA(128, 512, zero_sizes=True), sgd=False, lr=1e-3, steps=60
    )
    blown = first(monitor, "codes_blown_up")
    assert blown is not None and blown.step == 1 and passed is None
    assert first(monitor, "loss_reduction") is None and first(monitor, "lag") is None


def test_vector_quantize_pytorch_starts_its_cluster_sizes_at_one_and_raises_none():
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=128, codebook_size=512, decay=0.99, commitment_weight=0.25)
    for sgd, lr in ((True, 1e-2), (False, 1e-3)):
        monitor, passed = train_mlp(vq, sgd=sgd, lr=lr, steps=60)
        assert passed is None and new_alerts(monitor) == []
        monitor.detach()


def test_a_blown_up_code_chosen_is_named_at_the_step_it_is_chosen():
    class Chooses(nn.Module):  # a user's module that hands back the code it chose
        codebook_size = 4

        def forward(self, x, code):
            return {
                "quantized": code.expand_as(x),
                "indices": torch.zeros(len(x), dtype=torch.long),
            }

    module = Chooses()
    monitor = CollapseMonitor(module, warn=False)
    x = torch.randn(16, 8)
    module(x, x[:1])
    module(x, torch.full((1, 8), 1e5))  # norm 2.8e5, input norm ~2.7
    (alert,) = new_alerts(monitor)
    assert (alert.kind, alert.step) == ("blown_code_chosen", 2)
    assert alert.message == "a code of norm 3e5 was chosen: never-used codes have blown up"


# -- the codebook lags the encoder (vector-quantize-pytorch #26) ----------------------------


def test_vector_quantize_pytorch_codes_lag_an_encoder_that_runs_away():
    # the encoder's outputs grow 10x a step, as under the summed commitment above: the EMA
    # codes (decay 0.99) move a few per cent of that a step
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=32, codebook_size=64, decay=0.99)
    monitor = CollapseMonitor(vq, warn=False)
    data, losses = torch.randn(256, 32), []
    for t in range(20):
        losses.append(float(vq(data * 10.0 ** max(0, t - 10))[2].detach()))
    lag = first(monitor, "lag")
    passed = next(i + 1 for i, v in enumerate(losses) if not v < 1e6)
    assert lag is not None and lag.step < passed, (lag, passed)
    assert lag.message.endswith("the codebook lags the encoder")
    assert new_alerts(monitor)[0].kind == "lag"


# -- fp16 -----------------------------------------------------------------------------------


def test_fp16_overflow_in_the_distances_is_named():
    torch.manual_seed(0)
    vq = TutorialVQEMA(16, 32).half().eval()
    monitor = CollapseMonitor(vq, warn=False)
    losses = []
    for scale in (1.0, 10.0, 100.0, 300.0):  # row norms ~4, 40, 400, 1200
        losses.append(float(vq(torch.randn(64, 16).half() * scale)[2]))
    alert = first(monitor, "fp16_overflow")
    passed = next(i + 1 for i, v in enumerate(losses) if not v < 1e6)
    assert alert is not None and alert.step == 3 and alert.step <= passed
    assert alert.message.startswith("fp16 overflow in the distances: squared norms reach ")
    assert alert.message.endswith("above float16's largest value 65504")


def test_vector_quantize_pytorch_under_fp16_autocast_on_the_cpu():
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=16, codebook_size=32).eval()
    monitor = CollapseMonitor(vq, warn=False)
    with torch.autocast("cpu", dtype=torch.float16):
        vq(torch.randn(64, 16))
        assert new_alerts(monitor) == []
        vq(torch.randn(64, 16) * 500)
    assert first(monitor, "fp16_overflow").step == 2


# -- the trainer ----------------------------------------------------------------------------


def blobs(n=600, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(4, dim, generator=g)[y] * 3 + torch.randn(n, dim, generator=g)
    return from_arrays(x.numpy(), y.numpy())


CONFIG = dict(epochs=3, batch_size=64, lr=3e-3, seed=0, progress=False, device="cpu")


@pytest.mark.parametrize("preset", ["fsq", "vq"])
def test_healthy_presets_in_the_trainer_raise_none(preset):
    torch.manual_seed(0)
    model = BottleneckClassifier(16, 4, quantizer=preset, hidden=32, bottleneck_dim=32)
    result = train(model, blobs(), config=TrainConfig(**CONFIG))
    assert all(row["alerts"] == [] for row in result.history), result.history
    assert not model.quantizer._forward_hooks  # the monitor left with the run


def test_the_trainer_writes_the_mechanism_into_history_and_guard_events():
    # a commitment weighted as a sum over 64 x 32 values would weigh it (2048 x beta)
    torch.manual_seed(0)
    model = BottleneckClassifier(
        16, 4, quantizer="vq-ema", hidden=32, bottleneck_dim=32, commitment_weight=4096.0
    )

    def poison(step, x, y):
        return (x * math.nan if step == 12 else x), y

    result = train(model, blobs(), config=TrainConfig(**CONFIG), batch_transform=poison)
    first_row = result.history[0]["alerts"]
    assert any(m.startswith("the commitment loss is 4e3 x the mean squared") for m in first_row)
    (event,) = [e for e in result.guard_events if e["step"] == 12]
    assert event["reason"].startswith("non-finite input batch skipped (while: ")
    assert "check its reduction" in event["reason"]


def test_mechanisms_state_round_trips():
    m = Mechanisms(5, bounded=False, single=True)
    m.norms.extend([(1.0, 2.0), (3.0, 4.0)])
    m.task_loss = 0.5
    other = Mechanisms(5, bounded=False, single=True)
    other.load_state_dict(m.state_dict())
    assert list(other.norms) == list(m.norms) and other.task_loss == 0.5
    assert [sci(v) for v in (3.2e5, 4096, 0.5)] == ["3e5", "4e3", "5e-1"]


def test_a_monitor_restored_from_its_state_goes_on_as_the_original():
    import json

    def feed(vq, monitor, start, stop):
        for t in range(start, stop):
            torch.manual_seed(t)
            vq(torch.randn(64, 16) * (1.0 if t < 8 else 1e3))

    torch.manual_seed(0)
    a, b = (TutorialVQEMA(16, 32, reduction="sum", beta=4.0) for _ in range(2))
    b.load_state_dict(a.state_dict())
    ma, mb = CollapseMonitor(a, warn=False, window=5), CollapseMonitor(b, warn=False, window=5)
    feed(a, ma, 0, 6)
    feed(b, mb, 0, 6)
    mb.load_state_dict(json.loads(json.dumps(ma.state_dict())))
    feed(a, ma, 6, 12)
    feed(b, mb, 6, 12)
    assert ma.alerts == mb.alerts and {a.kind for a in ma.alerts} >= {"loss_reduction", "lag"}
    assert ma.report() == mb.report()
