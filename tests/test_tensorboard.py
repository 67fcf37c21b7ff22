"""TensorBoard events of train and compare, read back with tensorboard's own reader.

Every scalar must equal the run's history row (``metrics.jsonl``) rounded to float32, at
step = epoch, once; a resumed run must end with the events of the run never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from typer.testing import CliRunner

import stabq
import stabq.training.resume
from stabq.cli import app
from stabq.errors import ConfigError
from stabq.integrations import tensorboard as board
from stabq.saving import load_history

pytestmark = pytest.mark.outcome  # the runs are trained (tiny, but real)

runner = CliRunner()
DATA = "synthetic:16"
SMALL = ["--hidden", "16", "--bottleneck-dim", "8", "--batch-size", "256", "--quiet"]
FSQ = ["--quantizer", "fsq", "--option", "levels=[5,5]"]
GUMBEL = ["--quantizer", "gumbel", "--option", "codebook_size=16"]
# the history row's key behind each tag: the contract users' dashboards rely on
KEY_OF_TAG = {
    "train/loss": "train_loss",
    "train/cross_entropy": "train_ce",
    "train/aux_loss": "train_aux",
    "train/max_loss": "max_loss",
    "train/max_feature_norm": "max_feature_norm",
    "val/loss": "val_loss",
    "val/accuracy": "val_accuracy",
    "codebook/usage": "usage",
    "codebook/fill": "fill",
    "codebook/codes_used": "codes_used",
    "codebook/perplexity": "perplexity",
    "codebook/dead_codes": "dead_codes",
    "codebook/entropy_bits": "entropy_bits",
    "guard/events": "guard_events",
    "schedule/lr": "lr",
    "schedule/tau": "tau",
    "schedule/mix": "mix",
    "schedule/stage": "stage",
    "schedule/quantized": "quantized",
    "time/epoch_seconds": "seconds",
}


def read_events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] as TensorBoard shows them (after its purges; a tag whose
    points were all purged is left out)."""
    reader = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})
    reader.Reload()
    events = {
        tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]
    }
    return {tag: points for tag, points in events.items() if points}


def raw_steps(log_dir: Path, tag: str) -> list[int]:
    """Every step at which ``tag`` was ever written, over all event files, purged or not."""
    steps = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def f32(value) -> float:
    return float(np.float32(float(value)))


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_events_are_the_history(log_dir: Path, history: list[dict]) -> None:
    """One point per epoch for each figure of the rows, equal to it in float32; nothing else."""
    events = read_events(log_dir)
    want = {
        tag: [(row["epoch"], f32(row[key])) for row in history]
        for tag, key in KEY_OF_TAG.items()
        if history and history[0].get(key) is not None
    }
    assert sorted(events) == sorted(want)
    for tag, points in want.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert all(same(g, w) for (_, g), (_, w) in zip(got, points, strict=True)), (tag, got)


def without_seconds(events: dict) -> dict:
    return {tag: points for tag, points in events.items() if tag != "time/epoch_seconds"}


def train(out: Path, *args, epochs: int = 2):
    return runner.invoke(
        app, ["train", "--data", DATA, "--out", str(out), "--epochs", str(epochs), *SMALL]
        + [str(a) for a in args],
    )  # fmt: skip


def ok(result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stabq: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- the rows and the tags ----------------------------------------------------------------------


def test_every_numeric_figure_becomes_a_tag_and_none_is_skipped():
    row = {
        "epoch": 3, "stage": 2, "quantized": True, "train_loss": 0.5, "tau": None,
        "dead_codes": 4, "lr": np.float64(1e-3), "note": "text", "new_figure": 2.5,
        "max_loss": float("inf"),
    }  # fmt: skip
    assert board.scalars(row) == {
        "schedule/stage": 2.0, "schedule/quantized": 1.0, "train/loss": 0.5,
        "codebook/dead_codes": 4.0, "schedule/lr": 1e-3, "other/new_figure": 2.5,
        "train/max_loss": float("inf"),
    }  # fmt: skip
    assert board.scalars({"epoch": 1, "quantized": False}) == {"schedule/quantized": 0.0}
    assert {board.TAGS[key] for key in board.TAGS} == set(KEY_OF_TAG)
    assert all(KEY_OF_TAG[board.TAGS[key]] == key for key in board.TAGS)


def test_each_epoch_is_on_disk_as_it_ends(tmp_path):
    """The Python face: a writer is an on_epoch callback; TensorBoard can read each epoch
    before the next one starts."""
    seen = []
    model = stabq.BottleneckClassifier(16, 4, "fsq", hidden=16, bottleneck_dim=8, levels=[5, 5])
    x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    y = np.arange(200) % 4
    config = stabq.TrainConfig(epochs=3, batch_size=64, progress=False)
    with board.TensorBoardWriter(tmp_path / "tb") as writer:

        def on_epoch(row):
            writer(row)
            seen.append([s for s, _ in read_events(tmp_path / "tb")["val/accuracy"]])

        result = stabq.train(model, (x, y), config=config, on_epoch=on_epoch)
    assert seen == [[1], [1, 2], [1, 2, 3]]
    assert_events_are_the_history(tmp_path / "tb", result.history)


def test_a_writer_on_another_rank_than_0_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(board.distributed, "is_main", lambda: False)
    with board.epoch_writer(tmp_path / "tb") as on_epoch:
        assert on_epoch is None
    assert not (tmp_path / "tb").exists()


# --- stabq train --tensorboard --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gumbel_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gumbel")
    ok(train(root / "model", *GUMBEL, "--tensorboard", root / "tb"))
    return root / "model", root / "tb"


def test_train_writes_every_figure_of_every_epoch(gumbel_run):
    model, tb = gumbel_run
    history = load_history(model)
    assert [row["epoch"] for row in history] == [1, 2]
    assert "schedule/tau" in read_events(tb)  # gumbel has a temperature
    assert_events_are_the_history(tb, history)


def test_a_new_run_in_a_used_directory_replaces_its_events(gumbel_run, tmp_path):
    tb = tmp_path / "tb"
    shutil.copytree(gumbel_run[1], tb)
    ok(train(tmp_path / "model", *FSQ, "--tensorboard", tb, epochs=1))
    assert_events_are_the_history(tb, load_history(tmp_path / "model"))  # no tau, one step
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2  # the old file is still there


# --- --resume ------------------------------------------------------------------------------------

EPOCHS = 4


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unbroken")
    ok(train(root / "model", *FSQ, "--tensorboard", root / "tb", epochs=EPOCHS))
    return root / "tb"


def interrupted_run(root: Path, monkeypatch, after_checkpoint: bool) -> tuple[Path, Path]:
    """A run stopped with checkpoint 2 on disk: right after it was written (epoch 2's events
    not yet), or as checkpoint 3 was about to be written (epoch 2's events there)."""
    save = stabq.training.resume.Checkpointer.save

    def stop(self, epoch, *args, **kwargs):
        if epoch == 3 and not after_checkpoint:
            raise KeyboardInterrupt
        saved = save(self, epoch, *args, **kwargs)
        if epoch == 2 and after_checkpoint:
            raise KeyboardInterrupt
        return saved

    out, tb = root / "model", root / "tb"
    with monkeypatch.context() as patch:
        patch.setattr(stabq.training.resume.Checkpointer, "save", stop)
        result = train(out, *FSQ, "--tensorboard", tb, epochs=EPOCHS)
    assert result.exit_code != 0 and not (out / "config.json").exists()
    assert raw_steps(tb, "train/loss") == ([1] if after_checkpoint else [1, 2])
    return out, tb


@pytest.mark.parametrize("after_checkpoint", [True, False])
def test_resume_continues_the_events_with_no_step_twice(
    tmp_path, monkeypatch, unbroken, after_checkpoint
):
    out, tb = interrupted_run(tmp_path, monkeypatch, after_checkpoint)
    ok(runner.invoke(app, ["train", "--resume", str(out), "--quiet"]))  # the directory recorded
    history = load_history(out)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert_events_are_the_history(tb, history)
    assert without_seconds(read_events(tb)) == without_seconds(read_events(unbroken))
    assert raw_steps(tb, "train/loss") == [1, 2, 3, 4]  # not even a purged duplicate


def test_resume_into_a_new_directory_writes_the_epochs_done_before(tmp_path, monkeypatch, unbroken):
    out, _ = interrupted_run(tmp_path, monkeypatch, after_checkpoint=False)
    fresh = tmp_path / "elsewhere"
    ok(runner.invoke(app, ["train", "--resume", str(out), "--tensorboard", str(fresh), "--quiet"]))
    assert_events_are_the_history(fresh, load_history(out))
    assert without_seconds(read_events(fresh)) == without_seconds(read_events(unbroken))


# --- stabq compare --tensorboard -----------------------------------------------------------------


def test_compare_writes_one_run_per_method_and_seed(tmp_path):
    tb = tmp_path / "tb"
    args = ["--methods", "none,fsq", "--seeds", "2", "--epochs", "2", "--quiet"]
    ok(runner.invoke(app, ["compare", "--data", DATA, *args, "--tensorboard", str(tb)]))
    runs = sorted(str(p.parent.relative_to(tb)) for p in tb.rglob("events.out.tfevents.*"))
    assert runs == ["fsq/seed-0", "fsq/seed-1", "none/seed-0", "none/seed-1"]
    for run in runs:
        assert [s for s, _ in read_events(tb / run)["val/accuracy"]] == [1, 2], run


def test_compare_from_python_writes_each_runs_history(tmp_path):
    result = stabq.compare(
        DATA, ["vq-ema"], seeds=1, epochs=2, progress=False, tensorboard=tmp_path / "tb"
    )
    (record,) = result.records
    assert_events_are_the_history(tmp_path / "tb" / "vq-ema" / "seed-0", record["history"])


# --- refusals: one line, exit 2, nothing written or lost -----------------------------------------


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("where", ["a file", "under a file", "inside --out"])
def test_a_bad_tensorboard_path_is_refused_before_training(tmp_path, command, where):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    out = tmp_path / "out"
    target = {"a file": blocker, "under a file": blocker / "tb", "inside --out": out / "tb"}[where]
    before = tree(tmp_path)
    args = [command, "--data", DATA, "--out", str(out), "--tensorboard", str(target)]
    result = runner.invoke(app, [*args, "--epochs", "1", "--quiet"])
    line = one_line_error(result, f"--tensorboard {target}")
    assert ("inside --out" in line) == (where == "inside --out")
    assert tree(tmp_path) == before and not out.exists()


def test_an_unwritable_tensorboard_directory_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("permissions are not enforced for this user (root?)")
        result = train(tmp_path / "model", *FSQ, "--tensorboard", parent / "tb")
        one_line_error(result, f"--tensorboard {parent / 'tb'}", "cannot write")
        assert list(parent.iterdir()) == [] and not (tmp_path / "model").exists()
    finally:
        parent.chmod(0o700)


def test_an_event_file_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch):
    """What a read-only disk does, as any user (root included): the OSError of opening."""
    from torch.utils.tensorboard import writer

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(writer.FileWriter, "__init__", refuse)
    result = train(tmp_path / "model", *FSQ, "--tensorboard", tmp_path / "tb")
    one_line_error(result, f"--tensorboard {tmp_path / 'tb'}", "Permission denied")
    assert not (tmp_path / "model").exists()


def test_without_the_tensorboard_package_the_error_says_what_to_install(tmp_path, monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of either now fails
    result = train(tmp_path / "model", *FSQ, "--tensorboard", tmp_path / "tb")
    one_line_error(result, "--tensorboard", "pip install 'stabq[tensorboard]'")
    assert not (tmp_path / "model").exists() and not (tmp_path / "tb").exists()
    with pytest.raises(ConfigError, match=r"pip install 'stabq\[tensorboard\]'"):
        board.TensorBoardWriter(tmp_path / "tb")
    with pytest.raises(ConfigError, match="tensorboard package"):
        stabq.compare(DATA, ["none"], seeds=1, epochs=1, tensorboard=tmp_path / "tb")


def test_import_stabq_does_not_import_tensorboard():
    code = (
        "import sys, stabq, stabq.cli, stabq.integrations.tensorboard; "
        "print(json.dumps([m for m in sys.modules if 'tensorboard' in m and 'stabq' not in m]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_how_to_commands_run_as_written(tmp_path, monkeypatch):
    """The TensorBoard how-to's lines, each run as written (``stabq`` as the command line's
    app, in this process: what is checked is the runs, not how a process starts), from an
    empty directory: each run's events hold every epoch once."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "how-to" / "tensorboard.md").read_text()
    block = page[page.index("## One run") :]
    block = block[block.index("```sh\n") + 6 : block.index("```", block.index("```sh\n") + 6)]
    commands = [line.split() for line in block.splitlines() if line.startswith("stabq train")]
    assert len(commands) == 2
    monkeypatch.chdir(tmp_path)
    for words in commands:
        result = runner.invoke(app, [*words[1:], "--quiet"])
        assert result.exit_code == 0, (result.output[-2000:], result.exception)
        log_dir = tmp_path / words[words.index("--tensorboard") + 1]
        epochs = int(words[words.index("--epochs") + 1])
        history = [
            json.loads(line)
            for line in (tmp_path / words[words.index("--out") + 1] / "metrics.jsonl")
            .read_text()
            .splitlines()
        ]
        events = read_events(log_dir)
        assert [step for step, _ in events["val/accuracy"]] == list(range(1, epochs + 1))
        assert [v for _, v in events["val/accuracy"]] == [
            float(np.float32(r["val_accuracy"])) for r in history
        ]
