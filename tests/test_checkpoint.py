"""Checkpoints: a run stopped at an epoch boundary and resumed ends bitwise as if never stopped.

In-process: the run is stopped by an exception raised at a given step (from
``batch_transform``) or after an epoch (from ``on_epoch``, once that epoch's
checkpoint is written). Killed processes are in test_cli_resume.py.
"""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from stabq import BottleneckClassifier, CheckpointError, TrainConfig, TrainingError, train
from stabq.data import from_arrays, load_data
from stabq.training import checkpoint as ckpt_module
from stabq.training.checkpoint import CHECKPOINT, load_checkpoint

pytestmark = pytest.mark.outcome  # the verdict depends on how training ends

EPOCHS = 4


class Stop(Exception):
    """Stands for a crash right after a checkpoint."""


@pytest.fixture(scope="module")
def blobs():
    data = load_data("synthetic:16", "train")
    return from_arrays(data.x[:1200], data.y[:1200], classes=data.classes, source="blobs")


def model(quantizer: str) -> BottleneckClassifier:
    """``quantizer``, or ``quantizer/encoder`` (the rows are then sequences of length 16)."""
    quantizer, _, encoder = quantizer.partition("/")
    torch.manual_seed(0)
    kwargs = {
        "fsq": {"levels": [5, 5, 5]},
        "rvq": {"num_quantizers": 2, "codebook_size": 16},
        "pq": {"num_subspaces": 4, "bits": 4},
        "vq": {"codebook_size": 64},
        "vq-ema": {"codebook_size": 64},
    }.get(quantizer, {})
    return BottleneckClassifier(
        16, 10, quantizer, hidden=32, bottleneck_dim=16, encoder=encoder or "mlp", **kwargs
    )


def faults(model: BottleneckClassifier):
    """Guard events, the last two just after a resume at step 34: a weight turned NaN as by
    a bad update (14, undone), batches of NaN (33) and x 1e4 (35) left out, the head's
    weights x 1e3 (36: a loss spike, undone from the snapshot), and the head's output
    turned around (49: no spike, but the epoch ends worse than the best one, so the run
    goes back to it)."""

    def inject(step: int, x: torch.Tensor, y: torch.Tensor):
        with torch.no_grad():
            if step == 14:
                model.head[0].weight[0, 0] = float("nan")
            if step == 36:
                model.head[3].weight.mul_(1e3)
            if step == 49:
                model.head[3].weight.mul_(-1.0)
        if step == 33:
            x = torch.full_like(x, float("nan"))
        if step == 35:
            x = x * 1e4
        return x, y

    return inject


def crash_at(stop: int, transform):
    """``transform``, but raising Stop at global step ``stop``."""

    def crashing(step, x, y):
        if step == stop:
            raise Stop
        return transform(step, x, y) if transform else (x, y)

    return crashing


def stop_after(epoch: int):
    def on_epoch(row):
        if row["epoch"] == epoch:
            raise Stop

    return on_epoch


def same_history(a: list[dict], b: list[dict]) -> bool:
    def strip(rows):
        return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows])

    return strip(a) == strip(b)


def assert_bitwise_equal(a: BottleneckClassifier, b: BottleneckClassifier) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert different == [], different


STEPS = 17  # steps an epoch: 1080 training rows in batches of 64
CASES = {
    # quantizer, config options, the steps where successive attempts crash
    "vq-kmeans-dead-codes": ("vq", {}, [2 * STEPS + 5]),
    # lr 2e-2: at the default rate this vanilla VQ-EMA learns too slowly to leave chance in
    # 4 epochs once the guard has cut its rate, and such a run now stops with an error
    "vq-ema-poisoned": ("vq-ema", {"poison": True, "lr": 2e-2}, [2 * STEPS + 1, 3 * STEPS + 2]),
    "rvq-two-stage-at-the-switch": ("rvq", {"two_stage": True, "stage1_epochs": 2}, [2 * STEPS]),
    "fsq-frozen-projector": ("fsq", {"two_stage": True, "freeze_projector": True}, [5, 40]),
    "gumbel": ("gumbel", {}, [STEPS + 9]),
    "pq-ramp": ("pq", {"two_stage": True, "ramp_epochs": 2}, [3 * STEPS + 1]),
    "cnn1d-rvq-two-stage": ("rvq/cnn1d", {"two_stage": True, "stage1_epochs": 1}, [STEPS + 3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_run_ends_bitwise_as_an_uninterrupted_one(blobs, tmp_path, case):
    quantizer, options, stops = CASES[case]
    poisoned = options.pop("poison", False)
    config = TrainConfig(
        epochs=EPOCHS, batch_size=64, seed=3, guard_window=30, progress=False, **options
    )

    def fresh():
        m = model(quantizer)
        return m, (faults(m) if poisoned else None)

    reference, transform = fresh()
    expected = train(reference, blobs, config=config, batch_transform=transform)
    if poisoned:
        steps = [e["step"] for e in expected.guard_events]
        assert [step for step in steps if step >= 0] == [14, 33, 35, 36]
        assert -1 in steps  # an epoch that needed undoing went back to the best one

    resumed = False
    for stop in stops:  # stopped, resumed from a fresh model, stopped again, ...
        attempt, transform = fresh()
        with pytest.raises(Stop):
            train(
                attempt, blobs, config=config, batch_transform=crash_at(stop, transform),
                checkpoint_dir=tmp_path, resume=resumed,
            )  # fmt: skip
        resumed = True
        assert load_checkpoint(tmp_path).epoch == stop // STEPS  # the last whole epoch's
    final, transform = fresh()
    result = train(
        final, blobs, config=config, batch_transform=transform,
        checkpoint_dir=tmp_path, resume=True,
    )  # fmt: skip
    assert_bitwise_equal(final, reference)
    assert same_history(result.history, expected.history)
    assert result.guard_events == expected.guard_events
    assert not final.training


def test_the_checkpoint_holds_every_state_the_run_depends_on(blobs, tmp_path):
    config = TrainConfig(epochs=3, batch_size=64, progress=False, guard_window=30)
    vq = model("vq")

    def fault(step, x, y):  # a weight turned NaN in epoch 2: one step undone
        if step == 20:
            with torch.no_grad():
                vq.head[0].weight[0, 0] = float("nan")
        return x, y

    with pytest.raises(Stop):
        train(
            vq, blobs, config=config, checkpoint_dir=tmp_path,
            batch_transform=fault, on_epoch=stop_after(2),
        )  # fmt: skip
    with safe_open(str(tmp_path / CHECKPOINT), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        dtypes = {k: f.get_tensor(k).dtype for k in ("rng.torch", "rng.data", "rng.numpy")}
    assert set(meta) == {"format", "state"}  # everything else is JSON, nothing pickled
    state = json.loads(meta["state"])
    for key in (
        "model.quantizer.codebook.embed",
        "model.quantizer.codebook.cluster_size",
        "model.quantizer.codebook.initted",
        "snapshot.quantizer.codebook.embed",
        "optim.0.exp_avg_sq",
        "snapshot_optim.0.exp_avg",
        "anchor.quantizer.codebook.embed",
        "anchor_optim.0.exp_avg",
    ):
        assert key in keys, key
    assert dtypes == {"rng.torch": torch.uint8, "rng.data": torch.uint8, "rng.numpy": torch.int64}
    assert state["epoch"] == 2 and len(state["history"]) == 2
    guard = state["guard"]
    assert [e["lr_scale"] for e in guard["events"]] == [0.5]  # step 20 undone
    assert guard["lr_scale"] == 1.0 and guard["recoveries"] == 1  # doubled back at 30 clean steps
    assert guard["undone"] == 1 and guard["best_val"] == state["history"][-1]["val_loss"]
    assert len(guard["losses"]) == len(guard["norms"]) == len(guard["inputs"]) == 30
    assert state["optimizer"]["param_groups"][0]["lr"] > 0
    assert len(state["rng"]["python"][1]) == 625


def test_resuming_a_finished_checkpoint_trains_nothing_more(blobs, tmp_path):
    config = TrainConfig(epochs=2, batch_size=64, progress=False)
    first, again = model("fsq"), model("fsq")
    done = train(first, blobs, config=config, checkpoint_dir=tmp_path)
    redo = train(again, blobs, config=config, checkpoint_dir=tmp_path, resume=True)
    assert_bitwise_equal(first, again)
    assert same_history(done.history, redo.history)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"lr": 1e-2}, "options lr=0.003"),
        ({"epochs": 5}, "options epochs=4"),
        ({"hidden": 16}, "model hidden=32"),
        ({"rows": 1000}, "data differ"),
    ],
)
def test_resuming_with_other_settings_is_refused(blobs, tmp_path, change, fragment):
    config = TrainConfig(epochs=EPOCHS, batch_size=64, progress=False)
    with pytest.raises(Stop):
        train(model("fsq"), blobs, config=config, checkpoint_dir=tmp_path, on_epoch=stop_after(1))
    before = (tmp_path / CHECKPOINT).read_bytes()
    other, data = model("fsq"), blobs
    if "hidden" in change:
        torch.manual_seed(0)
        other = BottleneckClassifier(16, 10, "fsq", hidden=16, bottleneck_dim=16, levels=[5, 5, 5])
    if "rows" in change:
        data = from_arrays(blobs.x[:1000], blobs.y[:1000], classes=blobs.classes)
    options = {"epochs": EPOCHS, **{k: v for k, v in change.items() if k in ("lr", "epochs")}}
    config = TrainConfig(batch_size=64, progress=False, **options)
    with pytest.raises(CheckpointError, match=fragment):
        train(other, data, config=config, checkpoint_dir=tmp_path, resume=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_a_fresh_run_does_not_overwrite_an_unfinished_one(blobs, tmp_path):
    config = TrainConfig(epochs=EPOCHS, batch_size=64, progress=False)
    with pytest.raises(Stop):
        train(model("fsq"), blobs, config=config, checkpoint_dir=tmp_path, on_epoch=stop_after(2))
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(CheckpointError, match=r"unfinished run \(epoch 2 done\).*--resume"):
        train(model("fsq"), blobs, config=config, checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_resume_without_a_checkpoint_is_refused(blobs, tmp_path):
    config = TrainConfig(epochs=2, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(model("fsq"), blobs, config=config, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="resume=True needs checkpoint_dir"):
        train(model("fsq"), blobs, config=config, resume=True)


def test_a_damaged_checkpoint_is_refused_in_one_line(blobs, tmp_path):
    config = TrainConfig(epochs=2, batch_size=64, progress=False)
    with pytest.raises(Stop):
        train(model("fsq"), blobs, config=config, checkpoint_dir=tmp_path, on_epoch=stop_after(1))
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable or damaged") as caught:
        train(model("fsq"), blobs, config=config, checkpoint_dir=tmp_path, resume=True)
    assert "\n" not in str(caught.value)


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(
    blobs, tmp_path, monkeypatch
):
    """ENOSPC halfway through writing epoch 2's checkpoint; then space is freed and it resumes."""
    config = TrainConfig(epochs=EPOCHS, batch_size=64, progress=False)
    real_halves = ckpt_module._halves
    writes = []

    def halves_then_full(data, epoch):
        writes.append(epoch)
        pieces = real_halves(data, epoch)
        yield next(pieces)
        if epoch == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        yield from pieces

    monkeypatch.setattr(ckpt_module, "_halves", halves_then_full)
    with pytest.raises(CheckpointError) as caught:
        train(model("vq"), blobs, config=config, checkpoint_dir=tmp_path)
    message = str(caught.value)
    assert message == (
        f"{tmp_path / CHECKPOINT}: cannot write the checkpoint of epoch 2 (the previous one "
        f"is kept) (No space left on device)"
    )
    assert writes == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]  # no temporary file left
    assert load_checkpoint(tmp_path).epoch == 1
    monkeypatch.undo()
    reference, resumed = model("vq"), model("vq")
    expected = train(reference, blobs, config=config)
    result = train(resumed, blobs, config=config, checkpoint_dir=tmp_path, resume=True)
    assert_bitwise_equal(resumed, reference)
    assert same_history(result.history, expected.history)


def test_a_diverged_run_leaves_no_checkpoint_behind(blobs, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(epochs=3, progress=False, max_recoveries=2, guard_window=10)

    def hopeless(step, x, y):
        return (x * 1e30 if step > 12 else x), y

    with pytest.raises(TrainingError):
        train(model("fsq"), blobs, config=config, checkpoint_dir=out, batch_transform=hopeless)
    assert list(tmp_path.iterdir()) == []


def test_numpy_and_python_random_states_come_back_on_resume(blobs, tmp_path):
    """stabq's own steps draw only from torch, but a user's hook may draw from these two."""
    config = TrainConfig(epochs=2, batch_size=64, progress=False)
    expected = []

    def draw_and_stop(row):  # runs just after the checkpoint of epoch 1 is written
        expected.append((np.random.random(), random.random()))
        raise Stop

    with pytest.raises(Stop):
        train(model("fsq"), blobs, config=config, checkpoint_dir=tmp_path, on_epoch=draw_and_stop)
    np.random.seed(99)
    random.seed(99)
    drawn = []

    def draw(step, x, y):
        if not drawn:
            drawn.append((np.random.random(), random.random()))
        return x, y

    train(
        model("fsq"), blobs, config=config, checkpoint_dir=tmp_path, resume=True,
        batch_transform=draw,
    )  # fmt: skip
    assert drawn == expected


def test_a_transformer_run_on_token_ids_resumes_bitwise(tmp_path):
    """Token ids (the built-in tokens task) through the transformer encoder, killed in its
    second epoch and resumed: the same weights and history as the run never stopped."""
    tokens = load_data("tokens", "train")
    data = from_arrays(tokens.x[:600], tokens.y[:600], source="tokens")
    config = TrainConfig(epochs=3, batch_size=64, seed=3, progress=False)

    def fresh() -> BottleneckClassifier:
        torch.manual_seed(0)
        return BottleneckClassifier(
            32, 6, "vq", hidden=32, bottleneck_dim=16, encoder="transformer", vocab_size=64,
            encoder_options={"d_model": 16, "layers": 1}, codebook_size=32,
        )  # fmt: skip

    reference = fresh()
    expected = train(reference, data, config=config)
    with pytest.raises(Stop):
        train(fresh(), data, config=config, batch_transform=crash_at(12, None),
              checkpoint_dir=tmp_path)  # fmt: skip
    assert load_checkpoint(tmp_path).epoch == 1
    final = fresh()
    result = train(final, data, config=config, checkpoint_dir=tmp_path, resume=True)
    assert_bitwise_equal(final, reference)
    assert same_history(result.history, expected.history)
