"""The ``stabq`` command: a thin typer shell over the Python API.

A user error (a :class:`StabqError`) prints one line and exits with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from stabq.errors import ConfigError, StabqError
from stabq.quantizers.registry import FSQ_LEVELS, recommended_levels

app = typer.Typer(
    name="stabq",
    help="Stable discrete bottlenecks for classifiers: train, compare and inspect quantizers.",
    no_args_is_help=True,
    add_completion=False,
)

T = TypeVar("T")
DATA_HELP = (
    "A built-in dataset (mnist1d, digits, digits:images, synthetic, synthetic:DIM) or a file: "
    ".npz (arrays x, y; x of any rank (N, ...), uint8 images scaled to [0, 1]), .pt / "
    ".safetensors (tensors x, y), .csv / .parquet (label column 'label', else the last)."
)
ENCODER_HELP = (
    "mlp (feature rows), cnn1d (sequences (N, L) or (N, C, L)), cnn2d (images (N, C, H, W)), "
    "or package.module:factory, a callable (input_shape, out_dim) -> torch.nn.Module."
)
EncoderOption = Annotated[str, typer.Option("--encoder", help=ENCODER_HELP)]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks of user errors.")]
DataOption = Annotated[str, typer.Option("--data", help=DATA_HELP, show_default=False)]
TensorBoardOption = Annotated[
    Path | None,
    typer.Option(help="Write TensorBoard events to DIR, epoch by epoch.", metavar="DIR"),
]
PartOption = Annotated[
    str, typer.Option(help="Which part of a built-in dataset: train, test or all.")
]


def _show_version(value: bool) -> None:
    if value:
        from stabq import __version__

        typer.echo(f"stabq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Stable discrete bottlenecks for classifiers: train, compare and inspect quantizers."""


def run_user_command(call: Callable[[], T], debug: bool = False) -> T:
    """Run ``call``; a StabqError becomes one line on stderr and exit status 2."""
    try:
        return call()
    except StabqError as err:
        if debug:
            raise
        text = " ".join(str(err).split())  # one line, whatever the message holds
        text = text if len(text) <= 1000 else text[:997] + "..."
        print(f"stabq: error: {text}", file=sys.stderr)
        raise typer.Exit(code=2) from None


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each VALUE read as JSON when it parses (``levels=[8,5,5,5]``)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE, e.g. levels=[8,5,5,5]")
        try:
            options[key] = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            options[key] = raw
    return options


# the options of `stabq train` a checkpoint records, so that --resume DIR can repeat them
RUN_OPTIONS = (
    "data", "out", "quantizer", "option", "val_data", "epochs", "batch_size", "lr", "seed",
    "hidden", "bottleneck_dim", "two_stage", "stage1_epochs", "freeze_projector",
    "ramp_epochs", "init_from", "guards", "encoder",
)  # fmt: skip


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option("--data", help=DATA_HELP, show_default=False)] = None,
    out: Annotated[
        Path | None, typer.Option(help="Model directory to write.", show_default=False)
    ] = None,
    quantizer: Annotated[str, typer.Option(help="Preset: fsq, vq, rvq, gumbel, pq, ...")] = "fsq",
    encoder: EncoderOption = "mlp",
    option: Annotated[
        list[str] | None,
        typer.Option(help="Quantizer option KEY=VALUE (repeatable), e.g. levels=[8,5,5,5]."),
    ] = None,
    val_data: Annotated[
        str | None, typer.Option(help="Validation data (default: 10% of --data).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training data.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Inputs per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine schedule).")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed of weights, batches and splits.")] = 0,
    hidden: Annotated[int, typer.Option(help="Hidden width of projector and head.")] = 256,
    bottleneck_dim: Annotated[int, typer.Option(help="Features handed to the quantizer.")] = 128,
    two_stage: Annotated[
        bool, typer.Option(help="Train continuous first, seed the codebooks, then quantized.")
    ] = False,
    stage1_epochs: Annotated[
        int | None, typer.Option(help="Continuous epochs of --two-stage (default: a third).")
    ] = None,
    freeze_projector: Annotated[
        bool, typer.Option(help="Keep the projector fixed in stage 2.")
    ] = False,
    ramp_epochs: Annotated[
        int, typer.Option(help="Blend quantized features in over this many epochs.")
    ] = 0,
    init_from: Annotated[
        Path | None,
        typer.Option(help="Start stage 2 from this trained continuous stabq model directory."),
    ] = None,
    guards: Annotated[bool, typer.Option(help="Stability guards (undo exploding steps).")] = True,
    tensorboard: TensorBoardOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Finish the interrupted run whose --out was DIR, exactly as it would have "
            "ended; its other options come from its checkpoint.",
            metavar="DIR",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or summary.")] = False,
    debug: DebugOption = False,
) -> None:
    """Train a classifier with a discrete bottleneck and save it to OUT.

    A checkpoint in OUT after every epoch lets --resume OUT finish a killed run
    (and continue its --tensorboard events, with no epoch twice).

    Example: stabq train --data mnist1d --quantizer fsq --out runs/fsq
    (on N processes: torchrun --nproc_per_node=N -m stabq train ...; rank 0 writes OUT)
    """
    given = {k: v for k, v in locals().items() if k in RUN_OPTIONS}
    for name, value in (("--data", data), ("--out", out)):
        if value is None and resume is None:  # the usage error a required option gives
            usage_errors = sys.modules[typer.BadParameter.__module__]
            raise usage_errors.MissingParameter(
                ctx=ctx, param_hint=f"'{name}'", param_type="option"
            )
    if resume is not None:
        given = run_user_command(lambda: _resumed_options(ctx, resume, given), debug)
        (data, out, quantizer, option, val_data, epochs, batch_size, lr, seed, hidden,
         bottleneck_dim, two_stage, stage1_epochs, freeze_projector, ramp_epochs, init_from,
         guards, encoder) = given.values()  # fmt: skip

    def run() -> None:
        import torch

        from stabq import distributed
        from stabq.data import load_data, require_classes
        from stabq.encoders import check_encoder, check_input_shape
        from stabq.integrations import tensorboard as board
        from stabq.model import BottleneckClassifier
        from stabq.saving import load, save_model
        from stabq.training import TrainConfig
        from stabq.training import train as train_model

        config = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            guards=guards,
            two_stage=two_stage or init_from is not None,
            stage1_epochs=0 if init_from is not None else stage1_epochs,
            freeze_projector=freeze_projector,
            ramp_epochs=ramp_epochs,
            progress=None if not quiet else False,
        )
        options = parse_options(option or [])
        log_dir, history = board.for_train_run(tensorboard, out, resume)
        train_set = require_classes(load_data(data, "train"))
        val_set = load_data(val_data, "test", classes=train_set.classes) if val_data else None
        check_encoder(encoder)
        check_input_shape(encoder, train_set.input_shape, train_set.source)
        torch.manual_seed(seed)
        model = BottleneckClassifier(
            train_set.input_shape,
            train_set.num_classes,
            quantizer=quantizer,
            hidden=hidden,
            bottleneck_dim=bottleneck_dim,
            encoder=encoder,
            **options,
        )
        if init_from is not None and resume is None:
            model.take_continuous_weights(load(init_from))
        recorded = {**given, "tensorboard": log_dir.resolve() if log_dir else None}
        with board.epoch_writer(log_dir, history) as on_epoch:
            result = train_model(
                model, train_set, val_set, config, fit_feature_stats=init_from is None,
                checkpoint_dir=out, resume=resume is not None, on_epoch=on_epoch,
                run_info={"cli": json.loads(json.dumps(recorded, default=str))},
            )  # fmt: skip
        if distributed.is_main():
            save_model(
                model, out, classes=train_set.classes, history=result.history,
                train_config=config.to_dict(),
            )  # fmt: skip
        distributed.barrier()  # every rank leaves together, after rank 0 has saved
        if not quiet and distributed.is_main():
            last = result.final
            typer.echo(
                f"{quantizer}: val accuracy {last['val_accuracy']:.4f}, usage {last['usage']:.3f}, "
                f"perplexity {last['perplexity']:.1f}, {len(result.guard_events)} guard events, "
                f"{result.seconds:.1f} s -> {out}"
            )

    run_user_command(lambda: _under_torchrun(run), debug)


def _resumed_options(ctx: typer.Context, resume: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The options the run in ``resume`` was started with; any typed again must agree."""
    from stabq.training.resume import resume_arguments

    def typed_in(name: str) -> bool:  # not left at its default
        return getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"

    typed = {k: v for k, v in given.items() if typed_in(k)}
    recorded = resume_arguments(resume, typed)
    # a run recorded before --encoder existed used the MLP
    values = {k: recorded.get(k, "mlp") if k == "encoder" else recorded[k] for k in RUN_OPTIONS}
    values["out"] = resume
    values["init_from"] = None if values["init_from"] is None else Path(values["init_from"])
    return values


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="A model directory written by stabq train.")],
    data: DataOption,
    part: PartOption = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    debug: DebugOption = False,
) -> None:
    """Accuracy, loss and codebook health of a saved model on DATA."""

    def run() -> dict[str, Any]:
        import torch

        from stabq.data import load_data
        from stabq.rows import on_device
        from stabq.saving import load
        from stabq.training import evaluate_model

        model = load(model_dir)
        dataset = load_data(data, part, classes=model.classes)
        _check_features(dataset, model, model_dir)
        figures = evaluate_model(model, on_device(dataset.x, "cpu"), torch.from_numpy(dataset.y))
        return {"model": str(model_dir), "data": dataset.source, "rows": len(dataset.y), **figures}

    figures = run_user_command(run, debug)
    if as_json:
        typer.echo(json.dumps(figures))
        return
    for key, value in figures.items():
        typer.echo(f"{key:<14}{value:.4f}" if isinstance(value, float) else f"{key:<14}{value}")


@app.command()
def encode(
    model_dir: Annotated[Path, typer.Argument(help="A model directory written by stabq train.")],
    data: DataOption,
    out: Annotated[Path, typer.Option(help="Where to write the codes (.npy).", show_default=False)],
    part: PartOption = "test",
    debug: DebugOption = False,
) -> None:
    """Write the discrete codes of DATA: int64 .npy, one row per input, one column per codebook."""

    def run() -> tuple[int, int]:
        import numpy as np
        import torch

        from stabq.data import load_data
        from stabq.rows import Rows
        from stabq.saving import load

        model = load(model_dir)
        if not model.quantizer.quantization_enabled or model.quantizer.codebook_size == 0:
            raise ConfigError(f"{model_dir}: a continuous model (quantizer 'none') has no codes")
        dataset = load_data(data, part)
        _check_features(dataset, model, model_dir)
        with torch.no_grad():  # a memory-mapped file: its rows in chunks
            chunks = dataset.x.chunks() if isinstance(dataset.x, Rows) else [dataset.x]
            indices = [model(torch.from_numpy(x))[1].indices for x in chunks]
        codes = torch.cat(indices).reshape(len(dataset.y), -1).numpy().astype(np.int64)
        _save_npy(out, codes)
        return codes.shape

    rows, cols = run_user_command(run, debug)
    typer.echo(f"{rows} x {cols} codes -> {out}")


def _under_torchrun(call: Callable[[], T]) -> T:
    """Run ``call`` inside the process group torchrun's environment describes, if any."""
    from stabq.distributed import process_group_from_env

    with process_group_from_env():
        return call()


def _check_features(dataset, model, model_dir: Path) -> None:
    from stabq.data import require_fit

    require_fit(dataset, model.input_shape, model=f"the model in {model_dir}")


def _save_npy(path: Path, array) -> None:
    """Write the codes to ``path`` atomically; only ``.npy`` is accepted."""
    from stabq.errors import DataError
    from stabq.files import write_npy

    if path.suffix != ".npy":
        raise ConfigError(f"--out {path}: codes are written as .npy, give a path ending in .npy")
    write_npy(path, array, DataError, "the codes")


@app.command("compare")
def compare_command(
    data: Annotated[str, typer.Option("--data", help=DATA_HELP)] = "mnist1d",
    test_data: Annotated[
        str | None,
        typer.Option(
            help="Test data (default: a built-in's test part, else a stratified 20% of --data)."
        ),
    ] = None,
    encoder: EncoderOption = "mlp",
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods (default: the preset's). Known: "
            "none, vq-ema, vq, vq-1024, rvq, fsq, fsq-plain, gumbel, pq, "
            "fsq-2stage, vq-2stage."
        ),
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per method (default: preset's).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per run (default: preset's).")] = None,
    preset: Annotated[
        str, typer.Option(help="default, or stress: lr 3e-2 with guards off, where VQ-EMA fails.")
    ] = "default",
    out: Annotated[
        Path | None, typer.Option(help="Report directory (results.csv/json, report.md/html).")
    ] = None,
    tensorboard: TensorBoardOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    debug: DebugOption = False,
) -> None:
    """Train every method on DATA with several seeds and print the comparison table.

    Example: stabq compare --data mnist1d --seeds 3 --out runs/compare
    (under torchrun each run is trained on all processes; rank 0 prints and writes)
    --tensorboard DIR writes one TensorBoard run per method and seed: DIR/METHOD/seed-K.
    """
    from stabq.distributed import is_main

    def run():
        from tqdm.auto import tqdm

        from stabq.compare import PRESETS, compare
        from stabq.files import require_directory_path
        from stabq.integrations.tensorboard import check_log_dir
        from stabq.report import write_comparison

        if out is not None:  # before the runs, not after them
            require_directory_path(out, ConfigError, "the comparison")
        if tensorboard is not None:  # and not where --out will replace the events
            check_log_dir(tensorboard, outside=out)
        names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        spec = PRESETS.get(preset, PRESETS["default"])
        total = len(names or spec["methods"]) * (seeds or spec["seeds"])
        quiet_here = quiet or not is_main()
        bar = tqdm(total=total, desc="compare", unit="run", disable=True if quiet_here else None)

        def on_run(record):
            bar.update(1)
            bar.set_postfix(method=record["method"], seed=record["seed"])

        try:
            result = compare(
                data, names, seeds, epochs, preset, on_run=on_run,
                progress=False if quiet_here else None, encoder=encoder, test_data=test_data,
                tensorboard=tensorboard,
            )  # fmt: skip
        finally:
            bar.close()
        if out is not None and is_main():
            write_comparison(result, out)
        return result, is_main()

    result, main = run_user_command(lambda: _under_torchrun(run), debug)
    if not main:
        return
    from stabq.report import format_table

    typer.echo(format_table(result.rows))
    typer.echo(result.verdict)
    typer.echo(f"{result.seconds:.0f} s" + (f"; report in {out}" if out is not None else ""))


@app.command()
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


def main() -> None:
    """Entry point of ``python -m stabq``.

    A usage error (an unknown option, a value of the wrong type, a missing
    option) is one line and exit status 2 too, like every other user error.
    """
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as err:  # click's usage errors, raised when not standalone
        if type(err).__name__ != "NoArgsIsHelpError":  # plain `stabq` has printed the help
            text = " ".join(
                (err.format_message() if hasattr(err, "format_message") else str(err)).split()
            )
            command = getattr(getattr(err, "ctx", None), "command_path", "stabq")
            print(f"stabq: error: {text} (see: {command} --help)", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
