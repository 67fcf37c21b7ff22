"""The Trainer callbacks in docs/how-to/transformers.md's recipe, with the real transformers.

The recipe (the page's first python block) runs as written: a BERT encoder with an FSQ
bottleneck, 2 epochs of 16 steps on the tokens task with batch 3 (a corrupt reading) and
batch 6 (no label) poisoned, TensorBoard as the backend. The logged figures are read back
from `trainer.state.log_history` and the TensorBoard files and checked against a count of
the codes made here; the weights and optimiser state at each step show what the guard
kept out. Variants change one line of the block (asserted to match).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import stabq
from stabq.integrations.transformers import (
    CodebookHealthCallback,
    GuardCallback,
    GuardedTrainer,
    attach,
)

PAGE = Path(__file__).resolve().parents[1] / "docs" / "how-to" / "transformers.md"
GUARDED = "callbacks=[CodebookHealthCallback(), GuardCallback()],"
STEPS, LR = 32, 3e-3  # the recipe's: 2 epochs x 16 batches of 32, a linear schedule


def recipe() -> str:
    return re.search(r"```python\n(.*?)^```$", PAGE.read_text(), re.S | re.M).group(1)


class Record(transformers.TrainerCallback):
    """Each step's weights and optimiser state, each training forward's codes (with its
    step) and the rate each optimiser step runs at: the test's own account."""

    def __init__(self, trainer):
        self.trainer, self.model = trainer, trainer.model
        self.weights = [copy.deepcopy(trainer.model.state_dict())]  # [k + 1]: after step k
        self.states, self.codes, self.rates, self.step = [], [], [], 0
        trainer.model.quantizer.register_forward_hook(self.count)

    def count(self, module, args, output):
        if module.training:
            self.codes.append((self.step, output.indices.detach().clone()))

    def rate(self, optimizer, *_):  # inside optimizer.step(): the rate the step runs at
        self.rates.append(optimizer.param_groups[0]["lr"])

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.optimizer.optimizer.register_step_pre_hook(self.rate)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.weights.append(copy.deepcopy(self.model.state_dict()))
        self.states.append(copy.deepcopy(self.trainer.optimizer.state_dict()["state"]))


def run(*changes: tuple[str, str]) -> dict:
    block = recipe()
    for old, new in changes:
        assert block.count(old) == 1, f"the recipe no longer has {old!r}"
        block = block.replace(old, new)
    assert block.count("trainer.train()") == 1
    block = block.replace("trainer.train()", "record = watch(trainer)\ntrainer.train()")
    namespace = {"watch": watch, "__name__": "__recipe__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace


def watch(trainer) -> Record:
    record = Record(trainer)
    trainer.add_callback(record)  # after the guard: it sees each step as the guard left it
    return record


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def finite(model) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())


def schedule(step: int) -> float:
    """The linear schedule's rate at a step (0-based), as the Trainer's scheduler sets it."""
    return LR * (STEPS - step) / STEPS


@pytest.fixture(scope="module")
def guarded():
    return run()


def training_logs(namespace) -> list[dict]:
    return [e for e in namespace["trainer"].state.log_history if "loss" in e]


def test_the_training_figures_are_the_codes_counted_here(guarded):
    logs = training_logs(guarded)
    assert [e["step"] for e in logs] == [4, 8, 12, 16, 20, 24, 28, 32]
    codes = guarded["record"].codes
    assert [step for step, _ in codes] == [s for s in range(STEPS) if s not in (3, 19)]
    for entry in logs:
        counted = stabq.CodebookUsage(64000, grid=True)
        for step, indices in codes:  # the monitor's window (200) holds them all
            if step < entry["step"]:
                counted.update(indices)
        want = counted.compute()
        for key in ("usage", "fill", "codes_used", "perplexity", "entropy_bits"):
            assert entry[f"codebook/quantizer/{key}"] == pytest.approx(want[key], rel=1e-6)
        for key in ("top_codes", "aux_loss", "feature_norm", "saturation"):
            assert f"codebook/quantizer/{key}" in entry
        assert "codebook/quantizer/dead_codes" not in entry  # a grid has none


def test_the_evaluation_figures_are_the_whole_eval_set_counted_here(guarded):
    model, test = guarded["trainer"].model.eval(), guarded["test"]
    counted = stabq.CodebookUsage(64000, grid=True)
    handle = model.quantizer.register_forward_hook(lambda m, a, out: counted.update(out.indices))
    with torch.no_grad():
        for start in range(0, len(test), 100):
            rows = [test[i] for i in range(start, min(start + 100, len(test)))]
            model(**{k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    handle.remove()
    want = counted.compute()
    assert want["samples"] == len(test) == 256
    evaluations = [e for e in guarded["trainer"].state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evaluations] == [16, 32]
    for key in ("usage", "fill", "codes_used", "perplexity", "entropy_bits"):
        assert evaluations[-1][f"eval_codebook/quantizer/{key}"] == pytest.approx(want[key])
    assert not [k for k in evaluations[-1] if k.startswith("codebook/")]


def test_tensorboard_received_every_figure(guarded):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = Path(guarded["args"].output_dir).rglob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    history = guarded["trainer"].state.log_history
    for tag, key, where in [
        ("train/codebook/quantizer/usage", "codebook/quantizer/usage", "loss"),
        ("train/guard/events", "guard/events", "loss"),
        ("eval/codebook/quantizer/fill", "eval_codebook/quantizer/fill", "eval_loss"),
    ]:
        written = [(e.step, e.value) for e in board.Scalars(tag)]
        logged = [(e["step"], e[key]) for e in history if where in e]
        assert [s for s, _ in written] == [s for s, _ in logged]
        assert [v for _, v in written] == pytest.approx([v for _, v in logged], rel=1e-6)


def test_the_guard_leaves_no_trace_of_the_poisoned_batches(guarded):
    guard, record = guarded["trainer"].guard_callback.guard, guarded["record"]
    events = [(e["step"], e["epoch"], e["reason"]) for e in guard.events]
    assert events == [
        (3, 0, "non-finite input batch skipped"),
        (6, 0, "loss is nan"),
        (19, 1, "non-finite input batch skipped"),
        (22, 1, "loss is nan"),
    ]
    weights, states = record.weights, record.states  # weights[k + 1]: after step k
    for refused in (3, 19):  # never run: weights and optimiser state as before it
        assert same(weights[refused + 1], weights[refused])
        assert same_state(states[refused], states[refused - 1])
    assert same(weights[6 + 1], weights[0])  # undone: the snapshot made at the start
    assert same(weights[22 + 1], weights[11 + 1])  # ... and the one after 10 clean steps
    assert not same(weights[5 + 1], weights[0])
    assert guard.clean_steps == STEPS - 4 and guard.undone == 2
    assert finite(guarded["trainer"].model)
    assert [e["guard/events"] for e in training_logs(guarded)] == [1, 2, 2, 2, 3, 4, 4, 4]


def test_the_scheduler_keeps_owning_the_rate(guarded):
    logs = training_logs(guarded)
    assert [e["learning_rate"] for e in logs] == pytest.approx(
        [schedule(e["step"] - 1) for e in logs]
    )
    scale = [1.0] * 7 + [0.5] * 16 + [0.25] * 9  # halved by the undone steps 6 and 22
    assert guarded["record"].rates == pytest.approx([schedule(s) * scale[s] for s in range(32)])
    optimizer = guarded["trainer"].optimizer
    assert optimizer.param_groups[0]["lr"] == guarded["trainer"].lr_scheduler.get_last_lr()[0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(schedule(STEPS), abs=1e-12)


def test_without_the_guard_the_run_ends_with_non_finite_weights():
    unguarded = run(
        (GUARDED, "callbacks=[CodebookHealthCallback()],"),
        ("trainer.guard_callback.guard.events", "[]"),
    )
    assert not finite(unguarded["trainer"].model)


def test_a_non_finite_gradient_is_never_stepped():
    """No input check: the corrupt reading reaches the model and its gradient is NaN."""
    unchecked = run(
        (GUARDED, GUARDED.replace("GuardCallback()", "GuardCallback(input=lambda b: None)"))
    )
    guard, weights = unchecked["trainer"].guard_callback.guard, unchecked["record"].weights
    assert [(e["step"], e["reason"]) for e in guard.events][:2] == [
        (3, "gradient norm is nan"),
        (6, "loss is nan"),
    ]
    assert same(weights[3 + 1], weights[0])
    assert finite(unchecked["trainer"].model)


class Pair(torch.nn.Module):
    """A bottleneck model whose output can be a dict or a tuple."""

    config = None  # what the Trainer reads of a model's config: nothing

    def __init__(self, as_tuple=False):
        super().__init__()
        self.linear, self.quantizer, self.as_tuple = (
            torch.nn.Linear(2, 2),
            stabq.FSQ([5, 5]),
            as_tuple,
        )

    def forward(self, x, labels=None):
        loss = self.quantizer(self.linear(x)).quantized.pow(2).mean()
        return (loss,) if self.as_tuple else {"loss": loss}


def trainer(tmp_path, callbacks, cls=GuardedTrainer, model=None, **options):
    options = {"use_cpu": True, "report_to": "none", "save_strategy": "no", "max_steps": 2,
               "disable_tqdm": True, **options}  # fmt: skip
    args = transformers.TrainingArguments(str(tmp_path), **options)
    data = [{"x": torch.randn(2), "labels": torch.tensor(0)} for _ in range(8)]
    return cls(model=model or Pair(), args=args, train_dataset=data, callbacks=callbacks)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cls": transformers.Trainer}, "needs stabq.integrations.transformers.GuardedTrainer"),
        ({"gradient_accumulation_steps": 2}, "needs gradient_accumulation_steps=1, not 2"),
        ({"label_smoothing_factor": 0.1}, "needs the model's own loss"),
        ({"model": Pair(as_tuple=True)}, "needs the model to return its loss"),
    ],
)
def test_the_guard_refuses_what_it_cannot_guard_in_one_line(tmp_path, change, message):
    with pytest.raises(stabq.ConfigError, match=re.escape(message)):
        trainer(tmp_path, [GuardCallback()], **change).train()


def test_fp16_is_refused_and_health_must_come_before_the_reporters(tmp_path):
    fp16 = trainer(tmp_path, [GuardCallback()])
    fp16.args.fp16 = True  # a CPU run cannot set it: what a GPU run would see
    with pytest.raises(stabq.ConfigError, match="needs no fp16 GradScaler"):
        fp16.train()
    board = {"report_to": "tensorboard", "logging_steps": 1}
    late = trainer(tmp_path, [CodebookHealthCallback()], transformers.Trainer, **board)
    with pytest.raises(stabq.ConfigError, match="must come before the reporting callbacks"):
        late.train()
    attached = trainer(tmp_path, [], transformers.Trainer, **board)
    attach(attached, CodebookHealthCallback())
    attached.train()
    assert "codebook/quantizer/usage" in attached.state.log_history[0]
    with pytest.raises(stabq.ConfigError, match="found no quantizer in Linear"):
        trainer(tmp_path, [CodebookHealthCallback()], model=torch.nn.Linear(2, 2))


def test_a_process_group_without_gloo_is_refused(tmp_path, monkeypatch):
    """NCCL alone (a GPU run's default) cannot sum the counts, kept as CPU tensors."""
    nccl = trainer(tmp_path, [CodebookHealthCallback(), GuardCallback()])
    monkeypatch.setattr(stabq.distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *group: "nccl")
    with pytest.raises(stabq.ConfigError, match="needs a process group with gloo"):
        nccl.train()


def test_without_transformers_stabq_imports_and_the_module_says_what_to_install():
    probe = (
        "import sys; sys.modules['transformers'] = None\n"  # what a missing package looks like
        "import stabq, stabq.cli\n"
        "try:\n    import stabq.integrations.transformers\n"
        "except stabq.ConfigError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("pip install 'stabq[transformers]'")


def rows(n: int, seed: int) -> list[dict]:
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return [{"x": row, "labels": torch.tensor(0)} for row in x]


def _rank(rank: int, init: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        args = transformers.TrainingArguments(
            out, use_cpu=True, report_to="none", save_strategy="no", max_steps=3,
            per_device_train_batch_size=4, per_device_eval_batch_size=16, disable_tqdm=True,
        )  # fmt: skip
        trainer = GuardedTrainer(
            model=Pair(), args=args, train_dataset=rows(64, rank), eval_dataset=rows(64, 7),
            callbacks=[CodebookHealthCallback(), GuardCallback()],
        )  # fmt: skip
        trainer.train()  # under DistributedDataParallel, the guard agreeing over the ranks
        trainer.evaluate()
        logged = {k: v for k, v in trainer.state.log_history[-1].items() if "codebook" in k}
        torch.save({"logged": logged, "model": trainer.model.state_dict()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_log_the_codes_of_the_whole_eval_set(tmp_path):
    """64 evaluation rows, 32 per process: each logs the figures of all 64."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    saved = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    assert same(saved[0]["model"], saved[1]["model"])
    model = Pair().eval()
    model.load_state_dict(saved[0]["model"])
    x = torch.stack([r["x"] for r in rows(64, 7)])
    whole, half = stabq.CodebookUsage(25, grid=True), stabq.CodebookUsage(25, grid=True)
    with torch.no_grad():
        whole.update(model.quantizer(model.linear(x)).indices)
        half.update(model.quantizer(model.linear(x[:32])).indices)
    want = whole.compute()
    assert want["codes_used"] != half.compute()["codes_used"]  # so the sum over both matters
    for rank in range(2):
        got = saved[rank]["logged"]
        for key in ("usage", "fill", "codes_used", "perplexity", "entropy_bits"):
            assert got[f"eval_codebook/quantizer/{key}"] == pytest.approx(want[key]), key
