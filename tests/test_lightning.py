"""The Lightning callbacks in a LightningModule of a user's, with the real lightning package.

LOOP's module trains 2 epochs on digits with batch 5 poisoned, a CSVLogger, and both
callbacks; the logged figures are read back from metrics.csv and checked against a count
of the codes made here. Variants change one line of the block (asserted to match).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

import stabq
from stabq.integrations.lightning import GuardCallback, find_quantizers

CALLBACKS = "callbacks=[CodebookHealth(), GuardCallback()],"


LOOP = """\
import tempfile

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import stabq
from stabq.datasets import builtin_arrays
from stabq.integrations.lightning import CodebookHealth, GuardCallback


class Classifier(L.LightningModule):
    def __init__(self, quantizer: str = "fsq"):
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)
        )
        self.quantizer = stabq.build_quantizer(quantizer, 32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        q, indices, aux = self.quantizer(self.encoder(x))
        return self.head(q), aux

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits, aux = self(x)
        loss = F.cross_entropy(logits, y) + aux
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits, _ = self(x)
        self.log("val_accuracy", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


x, y, x_val, y_val = (torch.from_numpy(a) for a in builtin_arrays("digits"))
x, x_val = x / 16, x_val / 16
x[320:384] = float("nan")  # batch 5 is poisoned
torch.manual_seed(0)
model = Classifier("fsq")
logs = tempfile.mkdtemp()
trainer = L.Trainer(
    max_epochs=2,
    logger=CSVLogger(logs),
    callbacks=[CodebookHealth(), GuardCallback()],
    log_every_n_steps=5,
    default_root_dir=logs,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(
    model,
    DataLoader(TensorDataset(x, y), batch_size=64),
    DataLoader(TensorDataset(x_val, y_val), batch_size=256),
)
print(trainer.logger.log_dir)  # metrics.csv: codebook/quantizer/usage, ..., guard/events
"""


def run(*changes: tuple[str, str]) -> dict:
    block = LOOP
    for old, new in changes:
        assert block.count(old) == 1, f"LOOP no longer has {old!r}"
        block = block.replace(old, new)
    block = block.replace("trainer.fit(", "codes = record_codes(model)\ntrainer.fit(")
    namespace = {"record_codes": record_codes}
    logging.getLogger("lightning").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, "LOOP", "exec"), namespace)
    metrics = Path(namespace["trainer"].logger.log_dir) / "metrics.csv"
    namespace["rows"] = list(csv.DictReader(metrics.open()))
    return namespace


def record_codes(model) -> list[torch.Tensor]:
    """Every training-mode forward's code indices, as the test's own count."""
    codes: list[torch.Tensor] = []

    def hook(module, args, output):
        if module.training:
            codes.append(output.indices.detach().clone())

    model.quantizer.register_forward_hook(hook)
    return codes


def logged(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def finite(model) -> bool:
    return all(
        bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point()
    )


@pytest.fixture(scope="module")
def fsq():
    return run()


def test_the_logged_training_figures_are_the_codes_counted_here(fsq):
    usage = logged(fsq["rows"], "codebook/quantizer/usage")
    assert [step for step, _ in usage] == [4, 9, 14, 19, 24, 29, 34, 39, 44]
    codes = fsq["codes"]
    assert len(codes) == 46  # 2 epochs x 23 batches, the poisoned ones included
    for step, value in usage:
        counted = stabq.CodebookUsage(64000)
        for indices in codes[: step + 1]:  # the monitor's window (200) holds them all
            counted.update(indices)
        assert value == pytest.approx(counted.compute()["usage"], rel=1e-6)
    norms = [v for _, v in logged(fsq["rows"], "codebook/quantizer/feature_norm")]
    assert len(norms) == len(usage) and len(set(norms)) == len(norms)  # the poisoned batch's
    # NaN norm is left out of the mean, not left to blank the figure for 50 steps
    for key in ("fill", "perplexity", "entropy_bits", "top_codes", "aux_loss", "saturation"):
        assert logged(fsq["rows"], f"codebook/quantizer/{key}"), key
    assert not logged(fsq["rows"], "codebook/quantizer/dead_codes")  # a grid has none
    (sat,) = {round(v, 3) > 0 for _, v in logged(fsq["rows"], "codebook/quantizer/saturation")}
    assert sat


def test_the_validation_figures_are_those_of_the_trained_model(fsq):
    model = fsq["model"].eval()
    with torch.no_grad():
        indices = model.quantizer(model.encoder(fsq["x_val"])).indices
    counted = stabq.CodebookUsage(64000, grid=True)
    counted.update(indices)
    want = counted.compute()
    last = [r for r in fsq["rows"] if r.get("val_codebook/quantizer/usage")][-1]
    for key in ("usage", "fill", "codes_used", "perplexity", "entropy_bits"):
        assert float(last[f"val_codebook/quantizer/{key}"]) == pytest.approx(want[key], rel=1e-6)
    assert "val_codebook/quantizer/dead_codes" not in last


def test_the_guard_leaves_the_poisoned_batch_out_every_epoch(fsq):
    events = [(e["step"], e["epoch"]) for e in fsq["trainer"].callbacks[1].guard.events]
    assert events == [(5, 0), (28, 1)]
    assert finite(fsq["model"])
    assert [v for _, v in logged(fsq["rows"], "guard/events")][-1] == 2.0


def test_without_the_guard_the_same_run_ends_with_non_finite_weights():
    unguarded = run((CALLBACKS, "callbacks=[CodebookHealth()],"))
    assert not finite(unguarded["model"])


def test_a_vq_codebook_touched_by_the_poisoned_forward_is_put_back():
    """The repaired VQ updates its EMA codebook in the forward pass: the poisoned batch has
    moved it before any optimiser step; the guard puts the state before that batch back."""
    vq = run(('model = Classifier("fsq")', 'model = Classifier("vq")'))
    assert finite(vq["model"])
    assert vq["trainer"].callbacks[1].guard.undone == 0
    unguarded = run(
        ('model = Classifier("fsq")', 'model = Classifier("vq")'),
        (CALLBACKS, "callbacks=[CodebookHealth()],"),
    )
    codebook = {
        k: v for k, v in unguarded["model"].quantizer.state_dict().items() if v.is_floating_point()
    }
    assert not all(bool(torch.isfinite(v).all()) for v in codebook.values())


def test_callbacks_refuse_what_they_cannot_do_in_one_line():
    with pytest.raises(stabq.ConfigError, match="found no quantizer in Linear"):
        find_quantizers(torch.nn.Linear(3, 3))
    with pytest.raises(stabq.ConfigError, match="no quantizer at head"):
        find_quantizers(torch.nn.Sequential(stabq.FSQ([5, 5])), ["head"])
    assert list(find_quantizers(torch.nn.Sequential(stabq.FSQ([5, 5])))) == ["0"]

    class Manual(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.q = stabq.FSQ([5, 5])

        def training_step(self, batch, i):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)))
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[GuardCallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(stabq.ConfigError, match="needs automatic optimisation"):
        trainer.fit(Manual(), data)
