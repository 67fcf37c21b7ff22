"""Training until it stops improving (TrainConfig.patience): the rule, replayed on the run's
own figures; the model handed back is the best epoch's; stages; the ceiling; options."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stabq import BottleneckClassifier, ConfigError, TrainConfig, train
from stabq.compare.methods import PRESETS, plan
from stabq.data import from_arrays, load_data
from stabq.data.labeled import train_val_split
from stabq.training import evaluate_model
from stabq.training.stopping import THRESHOLD, Stopping


def replay(figures, patience, drops, ceiling, monitor="val_accuracy"):
    """The rule written out plainly: (epochs trained, best epoch, the rate's scale per
    epoch) for a stage that sees ``figures`` = [(accuracy, loss), ...] in turn."""
    best_acc, best_loss, best_epoch, wait, dropped, scale = -math.inf, math.inf, 0, 0, 0, 1.0
    scales = []
    for epoch, (acc, loss) in enumerate(figures, start=1):
        scales.append(scale)  # the rate this epoch trained at
        lower = loss < best_loss - THRESHOLD * abs(best_loss) or best_loss == math.inf
        by_accuracy = acc > best_acc or (acc == best_acc and lower)
        better = lower if monitor == "val_loss" else by_accuracy
        if better:
            best_acc, best_loss, best_epoch, wait = acc, loss, epoch, 0
        else:
            wait += 1
            if wait >= patience:
                if dropped == drops:
                    return epoch, best_epoch, scales
                dropped, wait, scale = dropped + 1, 0, scale * 0.1
        if epoch == ceiling:
            return epoch, best_epoch, scales
    return len(figures), best_epoch, scales


def test_the_rule_on_a_sequence_worked_by_hand():
    tiny = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    stop = Stopping(patience=2, drops=1)
    seen = [(0.5, 1.0), (0.6, 0.9), (0.6, 0.95), (0.6, 0.8), (0.55, 0.7), (0.6, 0.8)]
    ends = [stop.update(a, loss, e, tiny, opt) for e, (a, loss) in enumerate(seen, start=1)]
    # epoch 3 no better (same accuracy, higher loss); 4 better (same accuracy, lower loss);
    # 5 and 6 no better: the first wait of 2 drops the rate, the next would end the stage
    assert ends == [False] * 6
    assert (stop.best_epoch, stop.dropped, stop.scale, stop.wait) == (4, 1, 0.1, 0)
    assert stop.update(0.6, 0.8, 7, tiny, opt) is False
    assert stop.update(0.6, 0.8, 8, tiny, opt) is True


figures = st.lists(
    st.tuples(st.sampled_from([0.5, 0.6, 0.7, 0.8]), st.floats(0.1, 3.0)), min_size=1, max_size=40
)


@settings(max_examples=200, deadline=None)
@given(figures, st.integers(1, 4), st.integers(0, 3), st.sampled_from(["val_accuracy", "val_loss"]))
def test_the_stage_ends_where_the_plain_rule_says(seen, patience, drops, monitor):
    tiny = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    stop = Stopping(patience, drops, monitor=monitor)
    epochs, best, scales = replay(seen, patience, drops, ceiling=len(seen), monitor=monitor)
    for epoch, (acc, loss) in enumerate(seen, start=1):
        assert stop.scale == pytest.approx(scales[epoch - 1])
        if stop.update(acc, loss, epoch, tiny, opt):
            break
    assert (epoch, stop.best_epoch) == (epochs, best)


def test_going_back_puts_the_best_weights_back():
    tiny = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    stop = Stopping(patience=1, drops=0)
    stop.update(0.9, 0.1, 1, tiny, opt)
    best = {k: v.clone() for k, v in tiny.state_dict().items()}
    with torch.no_grad():
        tiny.weight.add_(1.0)
    assert stop.update(0.8, 0.2, 2, tiny, opt) is True
    stop.go_back(tiny, opt)
    assert all(torch.equal(tiny.state_dict()[k], v) for k, v in best.items())


@pytest.fixture(scope="module")
def blobs():
    data = load_data("synthetic:16", "train")
    return from_arrays(data.x[:900], data.y[:900], classes=data.classes, source="blobs")


def fresh(quantizer="fsq"):
    torch.manual_seed(0)
    options = {"levels": [5, 5, 5]} if quantizer == "fsq" else {"codebook_size": 32}
    return BottleneckClassifier((16,), 10, quantizer, hidden=32, bottleneck_dim=3, **options)


@pytest.mark.outcome
@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_a_run_follows_the_rule_on_its_own_figures_and_ends_at_its_best_epoch(blobs, quantizer):
    config = TrainConfig(
        epochs=30, patience=2, lr_drops=1, batch_size=64, lr=1e-2, progress=False, seed=1
    )
    model = fresh(quantizer)
    result = train(model, blobs, config=config)
    assert result.guard_events == []  # the guard's scale would move the rate too
    seen = [(row["val_accuracy"], row["val_loss"]) for row in result.history]
    epochs, best, scales = replay(seen, 2, 1, ceiling=30)
    assert (len(result.history), result.best_epoch) == (epochs, best)
    # after the warm-up epoch the rate is constant until each drop, 10x each
    steps = [row["lr"] / config.lr for row in result.history[1:]]
    assert steps == pytest.approx(scales[1:])
    # the model handed back is the best epoch's: the same validation figures, bit for bit
    row = result.history[best - 1]
    _, val = train_val_split(blobs, config.val_fraction, config.seed)
    again = evaluate_model(model, torch.from_numpy(val.x), torch.from_numpy(val.y))
    assert (again["accuracy"], again["loss"]) == (row["val_accuracy"], row["val_loss"])


def test_the_ceiling_ends_the_run_and_it_still_goes_back_to_the_best(blobs):
    config = TrainConfig(epochs=3, patience=50, batch_size=64, progress=False)
    result = train(fresh(), blobs, config=config)
    assert len(result.history) == 3
    accs = [(r["val_accuracy"], -r["val_loss"]) for r in result.history]
    assert result.best_epoch == 1 + accs.index(max(accs))


@pytest.mark.outcome
def test_each_stage_of_two_stage_training_stops_on_its_own(blobs):
    config = TrainConfig(
        epochs=24, patience=1, lr_drops=0, two_stage=True, batch_size=64, progress=False
    )
    result = train(fresh("vq"), blobs, config=config)
    stages = [row["stage"] for row in result.history]
    ends = [row["epoch"] for row in result.history if row["stage_end"]]
    first = stages.count(1)
    assert 1 <= first <= 24 // 3 and stages == [1] * first + [2] * (len(stages) - first)
    assert ends == [first, len(stages)]  # stage 1 ended where stage 2 began; then the run
    assert len(stages) < 24
    seen = [(r["val_accuracy"], r["val_loss"]) for r in result.history[first:]]
    epochs, best, _ = replay(seen, 1, 0, ceiling=24 - first)
    assert (len(seen), result.best_epoch) == (epochs, first + best)


def test_without_patience_the_run_keeps_its_fixed_length(blobs):
    result = train(fresh(), blobs, config=TrainConfig(epochs=4, batch_size=64, progress=False))
    assert len(result.history) == 4 and result.best_epoch is None


@pytest.mark.parametrize(
    "options",
    [{"patience": 0}, {"patience": True}, {"patience": 2.5}, {"lr_drops": -1},
     {"monitor": "accuracy"}],
)  # fmt: skip
def test_bad_options_are_refused(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        TrainConfig(**options)


def test_compare_trains_until_best_unless_a_fixed_length_is_asked():
    _, _, config = plan("default", None, None, None, None, None)
    assert (config.patience, config.epochs) == (PRESETS["default"]["patience"], 150)
    _, _, config = plan("default", None, None, 40, None, None)
    assert (config.patience, config.epochs) == (None, 40)  # --epochs alone: fixed
    _, _, config = plan("default", None, None, 60, None, None, 3)
    assert (config.patience, config.epochs) == (3, 60)  # --epochs with --patience: ceiling
    _, _, config = plan("stress", None, None, None, None, None)
    assert config.patience is None  # a failure of fixed-length runs keeps its length
    with pytest.raises(ConfigError, match="--option patience"):
        plan("default", None, None, None, None, {"patience": 3})


@pytest.mark.outcome
def test_a_run_that_stops_early_resumes_bitwise(blobs, tmp_path):
    from stabq.distributed import steps_per_epoch
    from test_checkpoint import Stop, assert_bitwise_equal, crash_at, same_history

    config = TrainConfig(
        epochs=18, patience=1, lr_drops=1, two_stage=True, stage1_epochs=9, batch_size=64,
        lr=1e-2, progress=False, seed=2,
    )  # fmt: skip
    reference = fresh("vq")
    expected = train(reference, blobs, config=config)
    stages = [row["stage"] for row in expected.history]
    first = stages.count(1)
    assert first < 9 and len(stages) < 18  # stage 1 and the run each stopped early
    steps = steps_per_epoch(len(blobs) - math.ceil(0.1 * len(blobs)), 64)
    # killed in stage 1 after a drop, then in stage 2: each resumed from its checkpoint
    for attempt, stop in enumerate([(first - 1) * steps + 2, (first + 1) * steps + 3]):
        with pytest.raises(Stop):
            train(fresh("vq"), blobs, config=config, batch_transform=crash_at(stop, None),
                  checkpoint_dir=tmp_path, resume=attempt > 0)  # fmt: skip
    final = fresh("vq")
    result = train(final, blobs, config=config, checkpoint_dir=tmp_path, resume=True)
    assert_bitwise_equal(final, reference)
    assert same_history(result.history, expected.history)
    assert result.best_epoch == expected.best_epoch


def test_the_command_line_trains_until_best_and_says_which_epoch(tmp_path):
    from typer.testing import CliRunner

    from stabq.cli import app
    from stabq.saving import read_config

    args = ["train", "--data", "synthetic:16", "--epochs", "30", "--patience", "1", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    config = read_config(tmp_path / "m")
    assert config["train_config"]["patience"] == 1
    result = CliRunner().invoke(app, ["train", "--data", "synthetic:16", "--epochs", "1",
                                      "--patience", "0", "--out", str(tmp_path / "n")])  # fmt: skip
    assert result.exit_code == 2 and "patience=0" in result.output
