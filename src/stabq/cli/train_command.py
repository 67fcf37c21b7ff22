"""``stabq train``: train a classifier with a discrete bottleneck, or finish a killed run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from stabq.cli.app import (
    DATA_HELP,
    DebugOption,
    EncoderOption,
    TensorBoardOption,
    _under_torchrun,
    app,
    load_model,
    parse_options,
    run_user_command,
)
from stabq.quantizers.registry import preset_names

REQUIRED = "  [required unless --resume]"
RUN_OPTIONS = (
    "data", "out", "quantizer", "option", "val_data", "epochs", "batch_size", "lr", "seed",
    "hidden", "bottleneck_dim", "two_stage", "stage1_epochs", "freeze_projector",
    "ramp_epochs", "init_from", "guards", "encoder",
)  # fmt: skip


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
    given = {k: v for k, v in locals().items() if k in RUN_OPTIONS}
    for name, value in (("--data", data), ("--out", out)):
        if value is None and resume is None:  # the usage error a required option gives
            usage_errors = sys.modules[typer.BadParameter.__module__]
            raise usage_errors.MissingParameter(
                ctx=ctx, param_hint=f"'{name}'", param_type="option"
            )
    if resume is not None:
        given = run_user_command(lambda: _resumed_options(ctx, resume, given, trust_encoder), debug)
        (data, out, quantizer, option, val_data, epochs, batch_size, lr, seed, hidden,
         bottleneck_dim, two_stage, stage1_epochs, freeze_projector, ramp_epochs, init_from,
         guards, encoder) = given.values()  # fmt: skip

    def run() -> None:
        import torch

        from stabq import distributed
        from stabq.data.labeled import require_classes
        from stabq.data.load import load_data
        from stabq.integrations import tensorboard as board
        from stabq.model.classifier import BottleneckClassifier
        from stabq.model.encoders import check_encoder, check_input_shape
        from stabq.model.saving import save_model
        from stabq.model.trust import remember_run
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
        remember_run(out, encoder)  # a later --resume OUT in this process needs no flag
        if init_from is not None and resume is None:
            model.take_continuous_weights(load_model(init_from, trust_encoder))
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
                f"{quantizer}: val accuracy {last['val_accuracy']:.4f}, fill {last['fill']:.3f}, "
                f"perplexity {last['perplexity']:.1f}, {len(result.guard_events)} guard events, "
                f"{result.seconds:.1f} s -> {out}"
            )

    run_user_command(lambda: _under_torchrun(run), debug)


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
    values = {k: recorded.get(k, "mlp") if k == "encoder" else recorded[k] for k in RUN_OPTIONS}
    trusted = trust_encoder or run_started_here(resume, values["encoder"])
    require_trusted(
        values["encoder"], f"--resume {resume}", trusted=trusted, how=CLI_HINT, doing="resuming"
    )
    values["out"] = resume
    values["init_from"] = None if values["init_from"] is None else Path(values["init_from"])
    return values
