"""Every write of a training run, on a directory that cannot be written: one StabqError that
names the path and the reason, and no clean-up after the failure raises in its place."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import stabq
from bad_input import listing, read_only
from stabq.errors import CheckpointError, ConfigError, StabqError
from stabq.files import atomic_directory, write_chunks
from stabq.model import BottleneckClassifier
from stabq.training import TrainConfig

EROFS = OSError(errno.EROFS, os.strerror(errno.EROFS))


def small_run() -> tuple[BottleneckClassifier, tuple[np.ndarray, np.ndarray], TrainConfig]:
    torch.manual_seed(0)
    model = BottleneckClassifier(4, 3, "fsq", hidden=8, bottleneck_dim=4, levels=[3, 3])
    data = (np.random.default_rng(0).standard_normal((30, 4)), np.arange(30) % 3)
    return model, data, TrainConfig(epochs=1, progress=False)


def test_a_write_whose_clean_up_fails_too_raises_the_writes_error(tmp_path, monkeypatch):
    # The filesystem turns read-only between creating the temporary file and renaming it:
    # the rename and the removal of the temporary file both fail.
    def refuse(*args, **kwargs):
        raise EROFS

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(CheckpointError) as info:
        write_chunks(tmp_path / "c.bin", [b"abc"], CheckpointError, "the checkpoint")
    assert str(info.value) == (
        f"{tmp_path / 'c.bin'}: cannot write the checkpoint (Read-only file system)"
    )


def test_a_metrics_path_that_cannot_be_written_is_one_line_and_leaves_no_checkpoint(
    tmp_path, monkeypatch
):
    model, data, config = small_run()
    (tmp_path / "logs").mkdir()
    read_only(monkeypatch, tmp_path / "logs")
    metrics = tmp_path / "logs" / "metrics.jsonl"
    with pytest.raises(ConfigError) as info:
        stabq.train(model, data, config=config, metrics_path=metrics, checkpoint_dir=tmp_path / "c")
    assert str(info.value) == f"{metrics}: cannot write the metrics there (Read-only file system)"
    assert not (tmp_path / "c").exists()  # no checkpoint of a run that never started


def test_a_metrics_file_that_fails_mid_run_is_one_line(tmp_path, monkeypatch):
    model, data, config = small_run()

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import stabq.files

    real_open = open
    metrics = tmp_path / "metrics.jsonl"

    def fake_open(path, *args, **kwargs):
        return Full() if Path(path) == metrics else real_open(path, *args, **kwargs)

    monkeypatch.setattr(stabq.files, "open", fake_open, raising=False)
    with pytest.raises(ConfigError) as info:
        stabq.train(model, data, config=config, metrics_path=metrics)
    assert str(info.value) == f"{metrics}: cannot write the metrics (No space left on device)"


def test_an_events_file_that_cannot_be_closed_leaves_the_runs_own_error(tmp_path):
    pytest.importorskip("tensorboard")
    from stabq.integrations.tensorboard import TensorBoardWriter

    def refuse():
        raise EROFS

    writer = TensorBoardWriter(tmp_path / "tb")
    real_close, writer._writer.close = writer._writer.close, refuse
    with pytest.raises(CheckpointError, match="the run's own error"), writer:
        raise CheckpointError("the run's own error")
    with pytest.raises(ConfigError) as info, writer:  # no error of its own: the close's
        pass
    assert str(info.value) == (
        f"--tensorboard {tmp_path / 'tb'}: cannot write TensorBoard events there "
        f"(Read-only file system)"
    )
    real_close()


def test_a_model_that_cannot_replace_the_old_one_nor_put_it_back_says_where_it_is(
    tmp_path, monkeypatch
):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("the previous model")
    real_rename, renames = os.rename, []

    def rename(src, dst):  # the first rename (old model aside) works, the next two fail
        renames.append(dst)
        if len(renames) > 1:
            raise EROFS
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(StabqError) as info, atomic_directory(target, StabqError, "the model"):
        pass
    kept = Path(renames[0])
    assert str(info.value) == (
        f"{target}: cannot replace it (Read-only file system), nor put the previous one back "
        f"(Read-only file system): it is kept whole at {kept}"
    )
    monkeypatch.undo()
    assert listing(kept) == {"config.json": b"the previous model"} and not target.exists()
    shutil.rmtree(kept)
