"""Gumbel's temperature in a loop of one's own: anneal_steps, and the monitor's word when
nothing anneals it.

Without ``set_progress`` calls (stabq's trainer makes them) a GumbelQuantizer trains at
``tau_start`` for ever. ``anneal_steps=N`` makes it count its own training forwards and
follow the same exponential schedule over them; the monitor and the Lightning callback say,
once, when a Gumbel quantizer has trained for many steps still at ``tau_start``.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

import stabq
from stabq import BottleneckClassifier, CollapseWarning, ConfigError, GumbelQuantizer
from stabq.quantizers.gumbel import annealed_tau, gumbel_softmax
from stabq.swap import swap_quantizers

TAU_START, TAU_END = 5.0, 0.1


def train_forwards(q: nn.Module, n: int, dim: int = 6) -> None:
    q.train()
    for _ in range(n):
        q(torch.randn(16, dim)).quantized.sum().backward()


def test_tau_follows_the_schedule_over_the_training_forwards_and_stops_at_tau_end():
    q = GumbelQuantizer(6, 8, anneal_steps=10)
    taus = [q.tau]
    for _ in range(14):
        train_forwards(q, 1)
        taus.append(q.tau)
    assert taus[:11] == [annealed_tau(TAU_START, TAU_END, k / 10) for k in range(11)]
    assert taus[0] == TAU_START and taus[10] == TAU_END and taus[10:] == [TAU_END] * 5
    assert all(b < a for a, b in itertools.pairwise(taus[:11]))
    assert int(q.anneal_step) == 14


def test_each_training_forward_samples_at_the_scheduled_tau():
    """Code table eye(K): ``quantized`` is the sample, compared with gumbel_softmax at the
    schedule's tau on the same noise."""
    q = GumbelQuantizer(8, 8, anneal_steps=4)
    with torch.no_grad():
        q.embed.copy_(torch.eye(8))
    x = torch.randn(32, 8)
    for k in range(6):
        torch.manual_seed(k)
        got = q.train()(x).quantized
        torch.manual_seed(k)
        want = gumbel_softmax(q.to_logits(x), annealed_tau(TAU_START, TAU_END, min(1, k / 4)))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_eval_and_no_grad_forwards_do_not_count():
    q = GumbelQuantizer(6, 8, anneal_steps=10)
    train_forwards(q, 3)
    with torch.no_grad():
        q.train()(torch.randn(4, 6))  # as init_from_features runs it
    q.eval()(torch.randn(4, 6))
    q.quantization_enabled = False  # the continuous stage of two-stage training
    q.train()(torch.randn(4, 6, requires_grad=True))
    assert int(q.anneal_step) == 3 and q.tau == annealed_tau(TAU_START, TAU_END, 0.3)


def test_the_count_round_trips_through_state_dict_and_older_state_dicts_load():
    q = GumbelQuantizer(6, 8, anneal_steps=10)
    train_forwards(q, 4)
    state = q.state_dict()
    assert int(state["anneal_step"]) == 4
    resumed = GumbelQuantizer(6, 8, anneal_steps=10)
    resumed.load_state_dict(state)
    assert int(resumed.anneal_step) == 4 and resumed.tau == q.tau
    plain = GumbelQuantizer(6, 8)  # without anneal_steps: no count in its state
    assert "anneal_step" not in plain.state_dict()
    assert not [name for name, _ in plain.named_buffers() if "anneal" in name]
    plain.load_state_dict(state)  # a counted state, into a quantizer that keeps no count
    resumed.load_state_dict(plain.state_dict())  # a state saved before anneal_steps
    assert int(resumed.anneal_step) == 0 and resumed.tau == TAU_START


def test_a_saved_classifier_keeps_its_count(tmp_path):
    torch.manual_seed(0)
    model = BottleneckClassifier(10, 3, quantizer="gumbel", bottleneck_dim=6, anneal_steps=50)
    x = torch.randn(32, 10)
    for _ in range(7):
        logits, out = model.train()(x)
        (logits.sum() + out.loss).backward()
    stabq.save_model(model, tmp_path / "m", classes=["a", "b", "c"])
    loaded = stabq.load(tmp_path / "m")
    assert loaded.quantizer.anneal_steps == 50 and int(loaded.quantizer.anneal_step) == 7
    assert loaded.quantizer.tau == model.quantizer.tau == annealed_tau(TAU_START, TAU_END, 7 / 50)


def test_set_progress_takes_over_from_the_count():
    q = GumbelQuantizer(6, 8, anneal_steps=10)
    train_forwards(q, 3)
    q.set_progress(0.5)
    train_forwards(q, 3)
    assert q.tau == annealed_tau(TAU_START, TAU_END, 0.5)
    q.set_progress(1.0)
    assert q.tau == TAU_END


def test_anneal_steps_passes_through_presets_and_swaps_and_is_checked():
    assert stabq.build_quantizer("gumbel", 6, anneal_steps=20).anneal_steps == 20
    model = nn.Sequential(stabq.build_quantizer("fsq", 6))
    swap_quantizers(model, "gumbel", anneal_steps=30)
    assert isinstance(model[0], GumbelQuantizer) and model[0].anneal_steps == 30
    assert "anneal_steps=30" in repr(model[0])
    for bad in (0, 2.5, True, "100"):
        with pytest.raises(ConfigError, match=rf"anneal_steps={bad!r}, allowed is an integer"):
            GumbelQuantizer(6, anneal_steps=bad)


# -- the monitor says when nothing anneals it --------------------------------------------


def user_loop(q: nn.Module, steps: int, monitor_steps: int = 40) -> list[str]:
    """A loop of one's own, no set_progress; the CollapseWarnings that the monitor issued."""
    head = nn.Linear(6, 3)
    optimizer = torch.optim.SGD([*q.parameters(), *head.parameters()], lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with stabq.CollapseMonitor(q, unannealed_steps=monitor_steps, check_every=10):
            for _ in range(steps):
                out = q.train()(torch.randn(32, 6))
                loss = head(out.quantized).logsumexp(-1).mean() + out.loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return [str(w.message) for w in caught if issubclass(w.category, CollapseWarning)]


def test_the_monitor_says_once_when_a_gumbel_quantizer_trains_at_tau_start():
    torch.manual_seed(0)
    said = user_loop(stabq.build_quantizer("gumbel", 6), 120)
    (message,) = [m for m in said if "tau_start" in m]
    assert message.startswith("Gumbel temperature still at tau_start=5 after 40 training steps")
    assert "anneal_steps=N" in message and "set_progress(p)" in message


@pytest.mark.parametrize("annealed", ["anneal_steps", "set_progress"])
def test_the_monitor_says_nothing_when_tau_is_annealed(annealed):
    torch.manual_seed(0)
    if annealed == "anneal_steps":
        q = stabq.build_quantizer("gumbel", 6, anneal_steps=500)
    else:
        q = stabq.build_quantizer("gumbel", 6)
        q.register_forward_pre_hook(lambda m, a: m.set_progress(min(1.0, 0.001 + m.progress)))
    assert not [m for m in user_loop(q, 120) if "tau_start" in m]


def test_the_default_threshold_is_a_thousand_training_forwards_and_is_checked():
    q = stabq.build_quantizer("gumbel", 6)
    monitor = stabq.CollapseMonitor(q, warn=False, check_every=100)
    with torch.no_grad():
        for step in range(1, 1001):
            q.train()(torch.randn(2, 6))
            fired = [a.step for a in monitor.alerts if a.kind == "tau_not_annealed"]
            assert fired == ([] if step < 1000 else [1000])
    q.eval()(torch.randn(2, 6))  # an eval forward is not a training step
    assert monitor.state_dict()["tau_steps"] == 1000
    with pytest.raises(ConfigError, match="unannealed_steps=0, allowed is an integer >= 1"):
        stabq.CollapseMonitor(q, unannealed_steps=0)


def test_the_lightning_callback_says_it_once_and_not_when_annealed():
    lightning = pytest.importorskip("lightning")
    from stabq.integrations.lightning import CodebookHealth

    class Module(lightning.LightningModule):
        def __init__(self, **options) -> None:
            super().__init__()
            self.quantizer = stabq.build_quantizer("gumbel", 6, **options)
            self.head = nn.Linear(6, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.quantizer(x)
            return nn.functional.cross_entropy(self.head(out.quantized), y) + out.loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(320, 6), torch.randint(0, 3, (320,)))
    said = {}
    for name, options in (("plain", {}), ("annealed", {"anneal_steps": 100})):
        torch.manual_seed(0)
        trainer = lightning.Trainer(
            max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, log_every_n_steps=10,
            callbacks=[CodebookHealth(unannealed_steps=30, check_every=10)],
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Module(**options), torch.utils.data.DataLoader(data, batch_size=16))
        said[name] = [str(w.message) for w in caught if issubclass(w.category, CollapseWarning)]
    assert len([m for m in said["plain"] if "tau_start=5" in m]) == 1  # 60 steps, said once
    assert not [m for m in said["annealed"] if "tau_start" in m]
