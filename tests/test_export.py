"""stabq.export and ``stabq export``: the ONNX graph gives stabq's codes and logits.

Every preset behind every built-in encoder is exported (the tracing exporter: the
dynamo one takes seconds a model, and is checked on one) and run by
onnxruntime on rows the model has not seen. The codes must equal ``stabq encode``'s on
every row, except that a nearest-code search (VQ, RVQ, PQ, SimVQ) may decide one row of
the 300 otherwise: two codes within a few ulp of the same distance (measured: 3e-9
apart at 5.4e-3, after one EMA step left codes 0.1 apart), where onnxruntime's GEMM
rounds otherwise than torch's. Grids (FSQ, FSP, LFQ) and Gumbel's argmax agree on every
row. The logits agree within 1e-4 absolute and relative: the same float32 math
run by other kernels (onnxruntime's GEMM, tanh, erf), which round in other orders, a
few ulp per operation through about ten layers of logits below 10.

The models are tiny with a realistic state rather than trained: feature statistics
set, and one training-mode pass over more rows than any codebook has codes, which
seeds the k-means codebooks on distinct rows and sets the running statistics. Rows
whose features coincide (token rows of padding only, a small vocabulary) would seed
duplicate codes, whose exact ties each runtime breaks by its own rounding: the token
rows hold 3 or more of 49 tokens. PQ's subspaces are 4-dimensional (bottleneck 32):
256 codes in 2 dimensions leave near-ties that rounding decides.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stabq
from stabq.cli import app
from stabq.errors import ConfigError
from stabq.model.encoders import BUILTIN_ENCODERS, TOKEN_ENCODERS
from stabq.quantizers.gumbel import GumbelQuantizer
from stabq.training.evaluation import forward_chunks

ort = pytest.importorskip("onnxruntime")

SHAPES = {"mlp": (40,), "cnn1d": (16,), "cnn2d": (6, 6), "transformer": (8,), "bag": (8,)}
VOCAB = 50
SEED_ROWS = 1100  # more than any preset's codes (simvq: 1024)


def _rows(encoder: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if encoder not in TOKEN_ENCODERS:
        return torch.randn(n, *SHAPES[encoder], generator=gen) * 2 + 1
    ids = torch.randint(1, VOCAB, (n, *SHAPES[encoder]), generator=gen)
    ends = torch.randint(3, SHAPES[encoder][0] + 1, (n, 1), generator=gen)
    return ids.masked_fill(torch.arange(SHAPES[encoder][0]) >= ends, 0)  # padded


def _model(preset: str, encoder: str) -> stabq.BottleneckClassifier:
    torch.manual_seed(0)
    options = {}
    if encoder in TOKEN_ENCODERS:
        small = {"d_model": 16, "heads": 2, "layers": 1} if encoder == "transformer" else {}
        options = {"vocab_size": VOCAB, "encoder_options": small or {"d_model": 8}}
    model = stabq.BottleneckClassifier(
        SHAPES[encoder], 3, preset, hidden=16, bottleneck_dim=32, encoder=encoder, **options
    )
    x = _rows(encoder, SEED_ROWS, 1)
    if encoder not in TOKEN_ENCODERS:  # near the rows' mean 1 and std 2, not equal
        shape = model.stats_shape
        model.set_feature_stats(torch.rand(shape) + 0.5, torch.rand(shape) + 1.5)
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _ort(path, x: torch.Tensor) -> list[np.ndarray]:
    runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return runtime.run(None, {runtime.get_inputs()[0].name: x.numpy()})


def _eager(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and the codes as ``stabq encode`` writes them (one row per input)."""
    logits, codes = zip(*((lg, out.indices) for lg, out in forward_chunks(model, x)), strict=True)
    return torch.cat(logits).numpy(), torch.cat(codes).reshape(len(x), -1).numpy()


def _same(model, path, x: torch.Tensor) -> None:
    found, (logits, codes) = _ort(path, x), _eager(model, x)
    if model.quantizer.codebook_size == 0:  # preset none: logits only
        assert len(found) == 1
        np.testing.assert_allclose(found[0], logits, rtol=1e-4, atol=1e-4)
        return
    assert found[1].dtype == np.int64
    wrong = (found[1].reshape(len(x), -1) != codes).any(-1)
    if model.quantizer.grid or isinstance(model.quantizer, GumbelQuantizer):
        np.testing.assert_array_equal(found[1].reshape(len(x), -1), codes)
    else:  # a nearest-code search: a near-tie may fall either way, in one row at most
        assert int(wrong.sum()) <= 1, np.flatnonzero(wrong)
    np.testing.assert_allclose(found[0][~wrong], logits[~wrong], rtol=1e-4, atol=1e-4)
    if wrong.any():  # a near-tie fallen to the other code: that code's logits
        other = torch.from_numpy(found[1][wrong])
        with torch.no_grad():
            expected = model.logits_from_indices(other).numpy()
        np.testing.assert_allclose(found[0][wrong], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("encoder", BUILTIN_ENCODERS)
@pytest.mark.parametrize("preset", stabq.preset_names())
def test_onnx_gives_the_codes_and_logits(preset, encoder, tmp_path):
    model = _model(preset, encoder)
    path = stabq.export(model, tmp_path / "m.onnx", exporter="torchscript")
    _same(model, path, _rows(encoder, 300, 2))
    _same(model, path, _rows(encoder, 1, 3))  # the batch axis is dynamic


def test_dynamo_exporter(tmp_path):  # the default exporter, on the model with most to trace
    encoder = "transformer"
    model = _model("rvq", encoder)
    path = stabq.export(model, tmp_path / "m.onnx")
    _same(model, path, _rows(encoder, 200, 2))
    _same(model, path, _rows(encoder, 3, 3))


def test_export_keeps_training_flag_and_codes_are_spread(tmp_path):
    model = _model("vq", "mlp").train()
    stabq.export(model, tmp_path / "m.onnx", exporter="torchscript")
    assert model.training
    codes = _ort(tmp_path / "m.onnx", _rows("mlp", 300, 2))[1]
    assert len(np.unique(codes)) > 50  # a realistic state: the test compares many codes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "tflite"}, "format='tflite', allowed: onnx"),
        ({"exporter": "jit"}, "exporter='jit', allowed: dynamo, torchscript"),
    ],
)
def test_bad_options_are_refused(kwargs, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        stabq.export(_model("fsq", "mlp"), tmp_path / "m.onnx", **kwargs)
    assert not (tmp_path / "m.onnx").exists()


def test_refusals_name_the_preset_and_encoder(tmp_path):
    with pytest.raises(ConfigError, match=r"allowed is a stabq\.BottleneckClassifier"):
        stabq.export(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    off = _model("fsq", "mlp")
    off.quantizer.quantization_enabled = False
    with pytest.raises(ConfigError, match="quantizer 'fsq' has quantization off"):
        stabq.export(off, tmp_path / "m.onnx")

    class Untraceable(torch.nn.Module):  # a user's encoder with an op ONNX lacks
        def forward(self, x):
            return torch.special.bessel_j0(x[:, :4])

    user = stabq.BottleneckClassifier(
        8, 2, "fsq", hidden=8, bottleneck_dim=4, encoder=Untraceable()
    )
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ConfigError, match="quantizer 'fsq' and encoder 'instance:Untraceable'"):
        stabq.export(user, target, exporter="torchscript")
    assert target.read_bytes() == b"previous"  # a failure leaves the previous file


def _saved(tmp_path, preset: str = "rvq") -> str:
    model = _model(preset, "mlp")
    return str(stabq.save_model(model, tmp_path / "model", classes=["a", "b", "c"]))


def test_cli_export_writes_the_graph(tmp_path):
    folder, out = _saved(tmp_path), tmp_path / "model.onnx"
    result = CliRunner().invoke(
        app, ["export", folder, "--format", "onnx", "--out", str(out), "--exporter", "torchscript"]
    )
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    _same(stabq.load(folder), out, _rows("mlp", 100, 2))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "--format 'tflite', allowed: onnx"),
        (["--exporter", "jit"], "--exporter 'jit', allowed: dynamo, torchscript"),
        (["--out", "{tmp}"], "is a directory"),
    ],
)
def test_cli_bad_input_is_one_line_and_leaves_out_untouched(args, message, tmp_path):
    folder, out = _saved(tmp_path), tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["export", folder, "--exporter", "torchscript"]
    result = CliRunner().invoke(
        app, base + (args if "--out" in args else [*args, "--out", str(out)])
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert out.read_bytes() == b"previous"


def test_cli_missing_model_dir(tmp_path):
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "none"), "--out", str(out)])
    assert result.exit_code == 2
    assert "no such model directory" in result.stderr and not out.exists()
