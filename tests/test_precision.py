"""Mixed precision in stabq's trainer: TrainConfig(precision=...), --precision, the scaler.

bf16-mixed is the CPU path: its forward runs under autocast while the quantizer's math
stays float32; 16-mixed goes through a GradScaler whose overflow skips are its own, not
guard recoveries; "32" is the trainer as it was, bit for bit; resuming keeps the scaler.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

import stabq
from stabq import BottleneckClassifier, ConfigError, TrainConfig, train
from stabq.cli import app
from stabq.data import from_arrays, load_data
from stabq.saving import load_history, read_config
from stabq.training import epochs as epochs_module
from stabq.training.checkpoint import load_checkpoint
from stabq.training.precision import grad_scaler

HALF = (torch.bfloat16, torch.float16)
runner = CliRunner()


@pytest.fixture(scope="module")
def blobs():
    data = load_data("synthetic:16", "train")
    return from_arrays(data.x[:600], data.y[:600], classes=data.classes, source="blobs")


def tiny(quantizer: str = "vq", **kwargs) -> BottleneckClassifier:
    torch.manual_seed(0)
    return BottleneckClassifier(16, 10, quantizer, hidden=32, bottleneck_dim=16, **kwargs)


def config(**options) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 64, "progress": False, **options})


class HalfOps(TorchDispatchMode):
    """Records every op that produces a half-precision tensor while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype in HALF:
                self.ops.add(str(func))
        return out


def test_a_bad_precision_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError) as err:
        TrainConfig(precision="bf16")
    assert str(err.value) == "precision='bf16', allowed: 32, bf16-mixed, 16-mixed"
    with pytest.raises(ConfigError, match="precision=32,"):
        TrainConfig(precision=32)  # the names are strings, as Lightning's
    assert TrainConfig().precision == "32"


def test_16_mixed_on_a_torch_without_amp_grad_scaler_is_one_config_error(monkeypatch):
    monkeypatch.delattr(torch.amp, "GradScaler")
    with pytest.raises(ConfigError, match=r"16-mixed.*torch 2\.3"):
        grad_scaler("16-mixed", torch.device("cpu"))
    assert grad_scaler("bf16-mixed", torch.device("cpu")) is None


@pytest.mark.parametrize("name", stabq.preset_names())
def test_the_quantizer_math_stays_float32_under_autocast(name):
    quantizer = stabq.build_quantizer(name, dim=16)
    x = torch.randn(64, 16).bfloat16()
    spy = HalfOps()
    inner = quantizer._quantize

    def watched(flat):
        with spy:
            return inner(flat)

    quantizer._quantize = watched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(x)  # training mode: EMA updates and losses included
    assert spy.ops == set()  # distances, codebooks, losses: nothing in half precision
    assert out.loss.dtype == torch.float32 and out.quantized.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in quantizer.state_dict().values()
               if t.is_floating_point())  # fmt: skip
    quantizer._quantize = inner
    quantizer.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = quantizer(x)
    plain = quantizer(x.float())  # the same float32 math, without autocast
    assert torch.equal(under.indices, plain.indices)
    assert torch.equal(under.quantized, plain.quantized.bfloat16())


def dtypes_seen(model: BottleneckClassifier) -> dict[str, set]:
    """The head's output dtypes, in training and in eval mode, while hooked."""
    seen = {"train": set(), "eval": set()}

    def hook(module, inputs, output):
        seen["train" if module.training else "eval"].add(output.dtype)

    model.head.register_forward_hook(hook)
    return seen


@pytest.mark.outcome
def test_bf16_mixed_trains_a_tiny_model_that_ends_finite_and_healthy(blobs):
    model = tiny("vq", codebook_size=64)
    seen = dtypes_seen(model)
    result = train(model, blobs, config=config(epochs=6, lr=3e-2, precision="bf16-mixed"))
    assert seen == {"train": {torch.bfloat16}, "eval": {torch.bfloat16, torch.float32}}
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())  # fmt: skip
    assert all(t.dtype != torch.bfloat16 for t in model.state_dict().values())
    assert result.guard_events == []
    final = result.final
    assert math.isfinite(final["train_loss"]) and math.isfinite(final["val_loss"])
    assert final["val_accuracy"] > 0.5  # 10 classes: chance is 0.1; float32 ends at 0.7
    assert final["perplexity"] >= 10  # as many effective codes as classes: not collapsed
    assert "scaler_skips" not in final  # bfloat16 needs no scaler


@pytest.mark.outcome
def test_precision_32_is_the_trainer_as_it_was_bit_for_bit(blobs):
    runs = []
    for options in ({}, {"precision": "32"}):
        model = tiny("vq-ema", codebook_size=64)
        seen = dtypes_seen(model)
        result = train(model, blobs, config=config(**options))
        runs.append((model.state_dict(), [{k: v for k, v in r.items() if k != "seconds"}
                                          for r in result.history]))  # fmt: skip
        assert seen == {"train": {torch.float32}, "eval": {torch.float32}}
    (a, history_a), (b, history_b) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.dumps(history_a) == json.dumps(history_b)


def scaled_from(monkeypatch, init_scale: float) -> list:
    """Every GradScaler the trainer makes, starting at ``init_scale`` (far too high: the
    first fp16 backward overflows, and the scaler halves it until it does not)."""
    made = []

    def factory(precision, device):
        scaler = torch.amp.GradScaler(device.type, init_scale=init_scale)
        made.append((precision, scaler))
        return scaler

    monkeypatch.setattr(epochs_module, "grad_scaler", factory)
    return made


@pytest.mark.outcome
def test_16_mixed_counts_the_scalers_skips_apart_from_the_guards_recoveries(blobs, monkeypatch):
    made = scaled_from(monkeypatch, 2.0**24)
    model = tiny("vq", codebook_size=64)
    seen = dtypes_seen(model)

    def nan_weight_at_step_40(step, x, y):
        if step == 40:  # a weight turned NaN, as by a bad update: the loss is not finite
            with torch.no_grad():
                model.head[0].weight[0, 0] = float("nan")
        return x, y

    result = train(model, blobs, config=config(epochs=6, lr=3e-2, precision="16-mixed"),
                   batch_transform=nan_weight_at_step_40)  # fmt: skip
    ((precision, scaler),) = made
    assert precision == "16-mixed" and torch.float16 in seen["train"]
    skips = sum(row["scaler_skips"] for row in result.history)
    assert skips >= 1
    assert scaler.get_scale() == 2.0**24 * 0.5**skips  # each skip halved it; none grew it
    # the guard undid the NaN step alone (and may then go back to the best epoch, step -1):
    # the scaler's skips are no recoveries, and no events
    steps = [(e["step"], e["reason"]) for e in result.guard_events if e["step"] >= 0]
    assert steps == [(40, "loss is nan")]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.outcome
def test_a_resumed_16_mixed_run_keeps_the_scalers_state(blobs, monkeypatch, tmp_path):
    scaled_from(monkeypatch, 2.0**24)
    options = config(epochs=3, precision="16-mixed")
    reference = tiny("vq", codebook_size=64)
    expected = train(reference, blobs, config=options)
    assert expected.history[0]["scaler_skips"] >= 1  # the scale moved in epoch 1

    class Stop(Exception):
        pass

    def stop_after_1(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train(tiny("vq", codebook_size=64), blobs, config=options, checkpoint_dir=tmp_path,
              on_epoch=stop_after_1)  # fmt: skip
    saved = load_checkpoint(tmp_path).document["scaler"]
    assert saved["scale"] == 2.0**24 * 0.5 ** expected.history[0]["scaler_skips"]
    final = tiny("vq", codebook_size=64)
    result = train(final, blobs, config=options, checkpoint_dir=tmp_path, resume=True)
    a, b = final.state_dict(), reference.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # a fresh scaler would skip again
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in expected.history]


def test_a_checkpoint_of_a_float32_run_holds_no_scaler(blobs, tmp_path):
    train(tiny("fsq", levels=[5, 5]), blobs, config=config(epochs=1), checkpoint_dir=tmp_path)
    # the run finished: stabq.train leaves the checkpoint for the caller to remove
    assert load_checkpoint(tmp_path).document["scaler"] is None


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


SMALL = ["--data", "synthetic:16", "--epochs", "1", "--hidden", "16", "--bottleneck-dim", "8",
         "--batch-size", "256", "--quiet"]  # fmt: skip


def test_precision_reaches_the_config_json_of_stabq_train(tmp_path):
    out = tmp_path / "model"
    result = cli("train", *SMALL, "--quantizer", "vq", "--precision", "bf16-mixed", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert read_config(out)["train_config"]["precision"] == "bf16-mixed"
    assert len(load_history(out)) == 1


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_bad_precision_on_the_command_line_is_one_line_and_exit_2(tmp_path, command):
    if command == "train":
        result = cli("train", *SMALL, "--precision", "fp8", "--out", tmp_path / "m")
    else:
        result = cli("compare", "--data", "synthetic:16", "--methods", "none", "--seeds", "1",
                     "--epochs", "1", "--precision", "fp8", "--quiet")  # fmt: skip
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.splitlines()
    assert lines == ["stabq: error: precision='fp8', allowed: 32, bf16-mixed, 16-mixed"]


def test_precision_reaches_every_run_of_stabq_compare(monkeypatch):
    from stabq.compare import runs

    seen, real = [], runs.train

    def recording(model, data, config, **kwargs):
        seen.append(config.precision)
        return real(model, data, config=config, **kwargs)

    monkeypatch.setattr(runs, "train", recording)
    result = cli("compare", "--data", "synthetic:16", "--methods", "none,fsq", "--seeds", "1",
                 "--epochs", "1", "--precision", "bf16-mixed", "--quiet")  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert seen == ["bf16-mixed", "bf16-mixed"]


@pytest.mark.outcome
def test_two_stage_training_under_bf16_seeds_the_codebooks_in_float32(blobs):
    model = tiny("rvq", num_quantizers=2, codebook_size=16)
    options = config(epochs=3, lr=3e-2, two_stage=True, stage1_epochs=1, precision="bf16-mixed")
    result = train(model, blobs, config=options)
    assert [row["quantized"] for row in result.history] == [False, True, True]
    assert all(t.dtype == torch.float32 for t in model.quantizer.state_dict().values()
               if t.is_floating_point())  # fmt: skip
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert result.final["val_accuracy"] > 0.3  # 10 classes: chance is 0.1
