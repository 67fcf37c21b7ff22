"""``stabq.export``: a trained classifier as an ONNX graph, written atomically.

The graph is :class:`~stabq.model.export_graph.ExportGraph` (the standardisation, the
encoder, each quantizer's evaluation pass in plain operations, the head) traced by
``torch.onnx.export``; it is written beside the target and renamed over it, so a
failure leaves the previous file, or none.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from stabq.errors import ConfigError, ModelFileError, check
from stabq.files import write_chunks
from stabq.model.classifier import BottleneckClassifier
from stabq.model.export_graph import graph_of

FORMATS = ("onnx",)
EXPORTERS = ("dynamo", "torchscript")
OPSET = 18


def _sample(model: BottleneckClassifier) -> torch.Tensor:
    """Two rows of the model's input on its device: zeros, or padding ids for token ids."""
    device = model.feature_mean.device
    if model.vocab_size is not None:
        shape, pad = (2, *model.input_shape), model.arch["pad_id"]
        return torch.full(shape, pad, dtype=torch.long, device=device)
    return torch.zeros(2, *model.input_shape, dtype=model.feature_mean.dtype, device=device)


@contextlib.contextmanager
def _quiet():
    """No progress lines, warnings or fused attention while tracing (the fused path of
    ``nn.TransformerEncoderLayer`` has no ONNX form)."""
    logger = logging.getLogger("torch.onnx")
    level, fast = logger.level, torch.backends.mha.get_fastpath_enabled()
    logger.setLevel(logging.ERROR)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        logger.setLevel(level)


def _onnx_bytes(model: BottleneckClassifier, exporter: str) -> bytes:
    """The serialised ONNX graph of ``model`` (in evaluation mode)."""
    graph = graph_of(model)
    sample = _sample(model)
    source = "ids" if model.vocab_size is not None else "x"
    outputs = ["logits"] if graph.quantizer is None else ["logits", "codes"]
    with tempfile.TemporaryDirectory() as folder, _quiet(), torch.no_grad():
        target = Path(folder) / "model.onnx"
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(graph, (sample,), str(target), input_names=[source],
                              output_names=outputs, dynamic_shapes=({0: batch},),
                              opset_version=OPSET, dynamo=True, external_data=False)  # fmt: skip
        else:
            axes = {name: {0: "batch"} for name in (source, *outputs)}
            torch.onnx.export(graph, (sample,), str(target), input_names=[source],
                              output_names=outputs, dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)  # fmt: skip
        return target.read_bytes()


def export(
    model: BottleneckClassifier,
    path: str | Path,
    *,
    format: str = "onnx",
    exporter: str = "dynamo",
) -> Path:
    """Write a trained classifier as an ONNX graph: inputs in, `logits` and `codes` out.

    The graph takes the raw rows, as `model(x)` does: features `x` `(batch, *input_shape)`
    float32, standardised inside the graph with the model's statistics, or token ids
    `ids` `(batch, L)` int64 (padded to the model's `L` with its `pad_id`; ids are not
    checked in the graph). Its outputs are `logits` `(batch, num_classes)` float32 and
    `codes` int64, `(batch,)` or `(batch, num_codebooks)`: the codes `stabq encode`
    writes. A continuous model (preset `none`) has no codes: its graph gives `logits`
    alone. The batch axis is dynamic. The file is written beside `path` and renamed over
    it: a failure leaves the previous file, or none.

    Args:
        model: a `BottleneckClassifier` (as `stabq.load` or `stabq.train` returns it);
            its training flag is restored after the export.
        path: the `.onnx` file to write.
        format: `"onnx"`, the only format.
        exporter: `"dynamo"` (`torch.onnx.export(dynamo=True)`, through `torch.export`)
            or `"torchscript"` (`dynamo=False`, the tracing exporter, many times faster
            to run); both give the same outputs.

    Returns:
        `path`, as a `Path`.

    Raises:
        ConfigError: an unknown `format` or `exporter`, a model that is not a
            `BottleneckClassifier`, quantization off, or a model the exporter cannot
            trace (a user's encoder, say); the message names the preset and encoder.
        ModelFileError: `path` cannot be written.

    Examples:
        >>> import tempfile, pathlib, torch, stabq
        >>> model = stabq.BottleneckClassifier(6, 3, "fsq", hidden=16, bottleneck_dim=8)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = stabq.export(model, pathlib.Path(folder) / "model.onnx")
        ...     path.stat().st_size > 0
        True
    """
    check(format in FORMATS, f"format={format!r}, allowed: {', '.join(FORMATS)}")
    check(exporter in EXPORTERS, f"exporter={exporter!r}, allowed: {', '.join(EXPORTERS)}")
    check(
        isinstance(model, BottleneckClassifier),
        f"model of type {type(model).__name__}, allowed is a stabq.BottleneckClassifier",
    )
    path = Path(path)
    check(not path.is_dir(), f"{path}: is a directory, give the path of an .onnx file")
    preset, encoder = model.arch["quantizer"], model.arch["encoder"]
    was_training = model.training
    try:
        data = _onnx_bytes(model, exporter)
    except ConfigError:
        raise
    except Exception as err:  # what the tracer or the translation to ONNX refuses
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(
            f"cannot export the model of quantizer {preset!r} and encoder {encoder!r}: "
            f"{type(err).__name__}: {reason}"
        ) from None
    finally:
        model.train(was_training)
    write_chunks(path, [data], ModelFileError, "the ONNX model")
    return path


__all__ = ["EXPORTERS", "FORMATS", "export"]
