"""``stabq compare``: methods side by side on the user's data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stabq.cli.app import (
    DATA_HELP,
    DebugOption,
    EncoderOption,
    TensorBoardOption,
    app,
    parse_options,
    run_user_command,
    under_torchrun,
)
from stabq.cli.progress import RunProgress
from stabq.errors import ConfigError


def _methods_help() -> str:
    """Every method compare knows and each preset's own, read from the library."""
    from stabq.compare.methods import METHODS, PRESETS

    own = "; ".join(f"{name}: {','.join(spec['methods'])}" for name, spec in PRESETS.items())
    return f"Comma-separated methods (default: the preset's). Known: {', '.join(METHODS)}. ({own})"


def _preset_help() -> str:
    from stabq.compare.methods import PRESETS

    def length(spec: dict) -> str:
        if spec["patience"] is None:
            return f"{spec['epochs']} epochs"
        return f"until no better for {spec['patience']} epochs, at most {spec['epochs']}"

    shown = ", ".join(
        f"{name} ({spec['seeds']} seeds, {length(spec)})" for name, spec in PRESETS.items()
    )
    return (
        f"{shown}. stress: lr 3e-2 with guards off, where VQ-EMA collapses; explode: SGD "
        "scenarios where VQ-EMA's loss passes 1e10, guards off then on."
    )


@app.command("compare", short_help="Train every method on DATA and compare them.")
def compare_command(
    data: Annotated[str, typer.Option("--data", help=DATA_HELP, metavar="DATA")] = "mnist1d",
    test_data: Annotated[
        str | None,
        typer.Option(
            help="Test data (default: a built-in's test part, else a stratified 20% of --data).",
            metavar="DATA",
        ),
    ] = None,
    encoder: EncoderOption = "mlp",
    methods: Annotated[str | None, typer.Option(help=_methods_help(), metavar="A,B,...")] = None,
    seeds: Annotated[
        int | None, typer.Option(help="Seeds per method (default: preset's).", metavar="N")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Epochs per run, a fixed length; with --patience, the ceiling (default: "
            "the preset's).",
            metavar="N",
        ),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            help="Train each run until its validation accuracy has not improved for N epochs "
            "(the rate drops 10x twice first), then take its best epoch (default: the "
            "preset's).",
            metavar="N",
        ),
    ] = None,
    preset: Annotated[str, typer.Option(help=_preset_help(), metavar="NAME")] = "default",
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate (default: preset's).", metavar="LR")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Inputs per step (default: preset's).", metavar="N")
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(help="adamw or sgd (default: preset's).", metavar="NAME"),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            help="Training option KEY=VALUE (repeatable), a field of stabq.TrainConfig, e.g. "
            "weight_decay=0 or guards=false.",
            metavar="KEY=VALUE",
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="32, bf16-mixed or 16-mixed: each run's forward under autocast (default: 32).",
            metavar="P",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Report directory (results.csv/json, report.md/html).", metavar="DIR"),
    ] = None,
    tensorboard: TensorBoardOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars or progress lines.")] = False,
    debug: DebugOption = False,
) -> None:
    """Train every method on DATA with several seeds and print the comparison table.

    The gap and vs-best columns are paired differences in points with their 95% interval;
    the last line names the methods the data cannot tell from the best.

    Example: stabq compare --data mnist1d --seeds 3 --out runs/compare
    (under torchrun each run is trained on all processes; rank 0 prints and writes)
    --tensorboard DIR writes one TensorBoard run per method and seed: DIR/METHOD/seed-K.
    When the output is not a terminal, each run prints one progress line instead of bars.
    """
    # long: typer reads the options from this signature, one declaration each
    from stabq.distributed import is_main

    def run():
        from stabq.compare.report import write_comparison
        from stabq.compare.run import compare
        from stabq.files import require_directory_path
        from stabq.integrations.tensorboard import check_log_dir

        if out is not None:  # before the runs, not after them
            require_directory_path(out, ConfigError, "the comparison")
        if tensorboard is not None:  # and not where --out will replace the events
            check_log_dir(tensorboard, outside=out)
        recipe = {"lr": lr, "batch_size": batch_size, "optimizer": optimizer}
        recipe["precision"] = precision
        recipe = {k: v for k, v in recipe.items() if v is not None}
        options = {**parse_options(option or [], "weight_decay=0"), **recipe}
        with RunProgress(quiet or not is_main()) as progress:
            result = compare(
                data, methods, seeds, epochs, preset, on_run=progress.update,
                progress=progress.epoch_bars, encoder=encoder, test_data=test_data,
                tensorboard=tensorboard, options=options, on_start=progress.start,
                patience=patience,
            )  # fmt: skip
        if out is not None and is_main():
            write_comparison(result, out)
        return result, is_main()

    result, main = run_user_command(lambda: under_torchrun(run), debug)
    if not main:
        return
    from stabq.compare.report import format_table

    # explode: one table per scenario and guard setting, in the order they ran
    for section in dict.fromkeys((r.get("scenario"), r.get("guards")) for r in result.rows):
        if section[0] is not None:
            typer.echo(f"\n{section[0]}, guards {'on' if section[1] else 'off'}:")
        rows = [r for r in result.rows if (r.get("scenario"), r.get("guards")) == section]
        typer.echo(format_table(rows))
    typer.echo(result.verdict)
    typer.echo(f"{result.seconds:.0f} s" + (f"; report in {out}" if out is not None else ""))
