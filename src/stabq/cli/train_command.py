"""``stabq train``: train a classifier with a discrete bottleneck, or finish a killed run."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from stabq.cli.app import (
    DATA_HELP,
    DebugOption,
    EncoderOption,
    TensorBoardOption,
    app,
    load_model,
    parse_options,
    run_user_command,
    under_torchrun,
)
from stabq.quantizers.registry import preset_names

REQUIRED = "  [required unless --resume]"


@dataclass(frozen=True)
class TrainOptions:
    """The options of a ``stabq train`` run that its checkpoint records (``--resume`` repeats
    them), passed by name from the command line to the run."""

    data: str
    out: Path
    quantizer: str
    option: list[str] | None
    val_data: str | None
    epochs: int
    patience: int | None
    batch_size: int
    lr: float
    seed: int
    hidden: int
    bottleneck_dim: int
    two_stage: bool
    stage1_epochs: int | None
    freeze_projector: bool
    ramp_epochs: int
    init_from: Path | None
    guards: bool
    encoder: str
    precision: str


RUN_OPTIONS = tuple(f.name for f in fields(TrainOptions))


@app.command(short_help="Train a classifier with a discrete bottleneck; save it.")
def train(
    ctx: typer.Context,
    data: Annotated[
        str | None,
        typer.Option("--data", help=DATA_HELP + REQUIRED, metavar="DATA", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Model directory to write." + REQUIRED, metavar="DIR", show_default=False
        ),
    ] = None,
    quantizer: Annotated[
        str, typer.Option(help=f"Preset: {', '.join(preset_names())}.", metavar="NAME")
    ] = "fsq",
    encoder: EncoderOption = "mlp",
    option: Annotated[
        list[str] | None,
        typer.Option(
            help="Quantizer option KEY=VALUE (repeatable), e.g. levels=[8,5,5,5]; for the "
            "transformer or bag encoder also its own (d_model, heads, layers, ff)."
        ),
    ] = None,
    val_data: Annotated[
        str | None, typer.Option(help="Validation data (default: 10% of --data).")
    ] = None,
    epochs: Annotated[
        int, typer.Option(help="Passes over the training data; with --patience, the ceiling.")
    ] = 100,
    patience: Annotated[
        int | None,
        typer.Option(
            help="Train until the validation accuracy has not improved for N epochs (the "
            "rate drops 10x twice first), then keep the best epoch.",
            metavar="N",
        ),
    ] = None,
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
    precision: Annotated[
        str,
        typer.Option(
            help="32, bf16-mixed or 16-mixed: the forward under autocast in bfloat16 or "
            "float16 (16-mixed with a gradient scaler); weights and codebooks stay float32.",
            metavar="P",
        ),
    ] = "32",
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
    trust_encoder: Annotated[
        bool,
        typer.Option(
            "--trust-encoder",
            help="With --init-from or --resume: allow a model or run whose encoder is a user "
            "factory (package.module:factory); that module is imported and run, so only for "
            "one whose source you trust. Runs this same process started need no flag.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar or summary.")] = False,
    debug: DebugOption = False,
) -> None:
    """Train a classifier with a discrete bottleneck and save it to OUT.

    A checkpoint in OUT after every epoch lets --resume OUT finish a killed run
    (and continue its --tensorboard events, with no epoch twice). A model given to
    --init-from, or a run to --resume, whose encoder is a user factory needs
    --trust-encoder (not for a run this same process started).

    Example: stabq train --data mnist1d --quantizer fsq --out runs/fsq
    (on N processes: torchrun --nproc_per_node=N -m stabq train ...; rank 0 writes OUT)
    """
    # long: typer reads the options from this signature, one declaration each
    given = {k: v for k, v in locals().items() if k in RUN_OPTIONS}
    for name, value in (("--data", data), ("--out", out)):
        if value is None and resume is None:  # the usage error a required option gives
            usage_errors = sys.modules[typer.BadParameter.__module__]
            raise usage_errors.MissingParameter(
                ctx=ctx, param_hint=f"'{name}'", param_type="option"
            )
    if resume is not None:
        given = run_user_command(lambda: _resumed_options(ctx, resume, given, trust_encoder), debug)
    options = TrainOptions(**given)
    place = {"device": device, "quiet": quiet, "tensorboard": tensorboard, "resume": resume}

    def run() -> None:
        _train(options, trust_encoder=trust_encoder, **place)

    run_user_command(lambda: under_torchrun(run), debug)


def _config(options: TrainOptions, device: str, quiet: bool) -> Any:
    """The :class:`~stabq.TrainConfig` of ``options`` (``--init-from`` starts at stage 2)."""
    from stabq.training import TrainConfig

    seeded = options.init_from is not None
    return TrainConfig(
        epochs=options.epochs, patience=options.patience, batch_size=options.batch_size,
        lr=options.lr, seed=options.seed,
        device=device, guards=options.guards, two_stage=options.two_stage or seeded,
        stage1_epochs=0 if seeded else options.stage1_epochs,
        freeze_projector=options.freeze_projector, ramp_epochs=options.ramp_epochs,
        progress=None if not quiet else False, precision=options.precision,
    )  # fmt: skip


def _model(options: TrainOptions, train_set: Any, trust_encoder: bool, resume: Any) -> Any:
    """The untrained classifier ``options`` describe for ``train_set`` (with ``--init-from``,
    the continuous model's weights in it)."""
    import torch

    from stabq.data.ids import vocab_of
    from stabq.model.classifier import BottleneckClassifier
    from stabq.model.encoders import check_encoder, check_input_shape
    from stabq.model.trust import remember_run

    check_encoder(options.encoder)
    check_input_shape(options.encoder, train_set.input_shape, train_set.source)
    torch.manual_seed(options.seed)
    model = BottleneckClassifier(
        train_set.input_shape, train_set.num_classes, quantizer=options.quantizer,
        hidden=options.hidden, bottleneck_dim=options.bottleneck_dim, encoder=options.encoder,
        vocab_size=vocab_of(train_set), **parse_options(options.option or []),
    )  # fmt: skip
    remember_run(options.out, options.encoder)  # a later --resume OUT here needs no flag
    if options.init_from is not None and resume is None:
        model.take_continuous_weights(load_model(options.init_from, trust_encoder))
    return model


def _train(
    options: TrainOptions,
    *,
    device: str,
    quiet: bool,
    tensorboard: Path | None,
    resume: Path | None,
    trust_encoder: bool,
) -> None:
    """Train the run ``options`` describe, save it to ``options.out`` and say how it ended."""
    from stabq import distributed
    from stabq.data.labeled import require_classes
    from stabq.data.load import load_data
    from stabq.integrations import tensorboard as board
    from stabq.model.saving import save_model
    from stabq.training import train as train_model

    config = _config(options, device, quiet)
    parse_options(options.option or [])  # a malformed KEY=VALUE before any data is read
    log_dir, history = board.for_train_run(tensorboard, options.out, resume)
    train_set = require_classes(load_data(options.data, "train"))
    val_set = None
    if options.val_data:
        val_set = load_data(options.val_data, "test", classes=train_set.classes)
    model = _model(options, train_set, trust_encoder, resume)
    recorded = {**asdict(options), "tensorboard": log_dir.resolve() if log_dir else None}
    with board.epoch_writer(log_dir, history) as on_epoch:
        result = train_model(
            model, train_set, val_set, config, fit_feature_stats=options.init_from is None,
            checkpoint_dir=options.out, resume=resume is not None, on_epoch=on_epoch,
            run_info={"cli": json.loads(json.dumps(recorded, default=str))},
        )  # fmt: skip
    if distributed.is_main():
        save_model(
            model, options.out, classes=train_set.classes, history=result.history,
            train_config=config.to_dict(),
        )  # fmt: skip
    distributed.barrier()  # every rank leaves together, after rank 0 has saved
    if not quiet and distributed.is_main():
        last = result.final
        if result.best_epoch is not None:
            last = result.history[result.best_epoch - 1]
        best = (
            ""
            if result.best_epoch is None
            else (f", best of {len(result.history)} epochs: {result.best_epoch}")
        )
        typer.echo(
            f"{options.quantizer}: val accuracy {last['val_accuracy']:.4f}, "
            f"fill {last['fill']:.3f}, perplexity {last['perplexity']:.1f}, "
            f"{len(result.guard_events)} guard events, {result.seconds:.1f} s{best} -> "
            f"{options.out}"
        )


def _resumed_options(
    ctx: typer.Context, resume: Path, given: dict[str, Any], trust_encoder: bool
) -> dict[str, Any]:
    """The options the run in ``resume`` was started with; any typed again must agree, and
    a user factory as its encoder needs ``--trust-encoder`` (or a run of this process)."""
    from stabq.model.trust import CLI_HINT, require_trusted, run_started_here
    from stabq.training.resume import resume_arguments

    def typed_in(name: str) -> bool:  # not left at its default
        return getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"

    typed = {k: v for k, v in given.items() if typed_in(k)}
    recorded = resume_arguments(resume, typed)
    # a run recorded before --encoder existed used the MLP
    earlier = {"encoder": "mlp", "patience": None, "precision": "32"}  # options a run may predate
    values = {k: recorded[k] if k in recorded else earlier[k] for k in RUN_OPTIONS}
    trusted = trust_encoder or run_started_here(resume, values["encoder"])
    require_trusted(
        values["encoder"], f"--resume {resume}", trusted=trusted, how=CLI_HINT, doing="resuming"
    )
    values["out"] = resume
    values["init_from"] = None if values["init_from"] is None else Path(values["init_from"])
    return values
