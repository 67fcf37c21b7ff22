"""``stabq evaluate``, ``encode``, ``export`` and ``levels``: what a saved model or a codebook
size gives."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from stabq.cli.app import (
    DataOption,
    DebugOption,
    PartOption,
    TrustOption,
    app,
    load_model,
    run_user_command,
)
from stabq.errors import ConfigError, check
from stabq.model.export import EXPORTERS, FORMATS
from stabq.quantizers.registry import FSQ_LEVELS, recommended_levels


@app.command(short_help="Accuracy, loss and codebook health of a saved model.")
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="A model directory written by stabq train.")],
    data: DataOption,
    part: PartOption = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    trust_encoder: TrustOption = False,
    debug: DebugOption = False,
) -> None:
    """Accuracy, loss and codebook health of a saved model on DATA.

    A model whose encoder is a user factory loads only with --trust-encoder.
    """

    def run() -> dict[str, Any]:
        import torch

        from stabq.data.load import load_data
        from stabq.training import evaluate_model
        from stabq.training.batches import on_device

        model = load_model(model_dir, trust_encoder)
        dataset = load_data(data, part, classes=model.classes)
        _check_features(dataset, model, model_dir)
        figures = evaluate_model(model, on_device(dataset.x, "cpu"), torch.from_numpy(dataset.y))
        return {"model": str(model_dir), "data": dataset.source, "rows": len(dataset.y), **figures}

    figures = run_user_command(run, debug)
    if as_json:
        typer.echo(json.dumps(figures))
        return
    for key, value in figures.items():
        typer.echo(f"{key:<14}{_shown(key, value)}")


COUNTS = ("codes_used", "dead_codes")  # means over codebooks: whole for one codebook


def _shown(key: str, value: Any) -> str:
    """A figure as ``evaluate`` prints it: ``-`` where it does not apply (a grid's dead codes),
    counts without decimals when whole, other numbers to 4 places."""
    if value is None:
        return "-"
    if key in COUNTS and float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@app.command(short_help="Write the discrete codes of DATA to a .npy file.")
def encode(
    model_dir: Annotated[Path, typer.Argument(help="A model directory written by stabq train.")],
    data: DataOption,
    out: Annotated[Path, typer.Option(help="Where to write the codes (.npy).", show_default=False)],
    part: PartOption = "test",
    trust_encoder: TrustOption = False,
    debug: DebugOption = False,
) -> None:
    """Write the discrete codes of DATA: int64 .npy, one row per input, one column per codebook.

    A model whose encoder is a user factory loads only with --trust-encoder.
    """

    def run() -> tuple[int, int]:
        import numpy as np
        import torch

        from stabq.data.load import load_data
        from stabq.training.batches import on_device
        from stabq.training.evaluation import forward_chunks

        model = load_model(model_dir, trust_encoder)
        if not model.quantizer.quantization_enabled or model.quantizer.codebook_size == 0:
            raise ConfigError(f"{model_dir}: a continuous model (quantizer 'none') has no codes")
        dataset = load_data(data, part)
        _check_features(dataset, model, model_dir)
        rows = on_device(dataset.x, "cpu")  # a memory-mapped file: read chunk by chunk
        indices = [out.indices.cpu() for _, out in forward_chunks(model, rows)]
        codes = torch.cat(indices).reshape(len(dataset.y), -1).numpy().astype(np.int64)
        _save_npy(out, codes)
        return codes.shape

    rows, cols = run_user_command(run, debug)
    typer.echo(f"{rows} x {cols} codes -> {out}")


def _check_features(dataset, model, model_dir: Path) -> None:
    from stabq.data.labeled import require_fit

    require_fit(
        dataset, model.input_shape, model=f"the model in {model_dir}", vocab_size=model.vocab_size
    )


def _save_npy(path: Path, array) -> None:
    """Write the codes to ``path`` atomically; only ``.npy`` is accepted."""
    from stabq.errors import DataError
    from stabq.files import write_npy

    if path.suffix != ".npy":
        raise ConfigError(f"--out {path}: codes are written as .npy, give a path ending in .npy")
    write_npy(path, array, DataError, "the codes")


@app.command(short_help="The FSQ levels recommended for a codebook size.")
def levels(
    codebook_size: Annotated[
        int, typer.Argument(help=f"Codebook size, one of {sorted(FSQ_LEVELS)}.", show_default=False)
    ],
    debug: DebugOption = False,
) -> None:
    """Print the FSQ levels the FSQ paper recommends for CODEBOOK_SIZE codes."""
    found = run_user_command(lambda: recommended_levels(codebook_size), debug)
    levels_text = ",".join(map(str, found))
    typer.echo(f"{levels_text}\t({math.prod(found)} codes; use: --option levels=[{levels_text}])")


@app.command(name="export", short_help="Write a saved model as an ONNX graph.")
def export_model(
    model_dir: Annotated[Path, typer.Argument(help="A model directory written by stabq train.")],
    out: Annotated[Path, typer.Option(help="Where to write the graph.", show_default=False)],
    format: Annotated[str, typer.Option("--format", help="onnx, the only format.")] = "onnx",
    exporter: Annotated[
        str, typer.Option(help="dynamo (torch.export) or torchscript (the tracing exporter).")
    ] = "dynamo",
    trust_encoder: TrustOption = False,
    debug: DebugOption = False,
) -> None:
    """Write MODEL_DIR as an ONNX graph: raw rows (or token ids) in, logits and codes out.

    The codes are those stabq encode writes; a continuous model (quantizer 'none') gives
    logits alone. A model whose encoder is a user factory loads only with --trust-encoder.
    """

    def run() -> Path:
        from stabq.model.export import export

        check(format in FORMATS, f"--format {format!r}, allowed: {', '.join(FORMATS)}")
        check(exporter in EXPORTERS, f"--exporter {exporter!r}, allowed: {', '.join(EXPORTERS)}")
        return export(load_model(model_dir, trust_encoder), out, format=format, exporter=exporter)

    typer.echo(f"{model_dir} -> {run_user_command(run, debug)}")
