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
    _under_torchrun,
    app,
    run_user_command,
)
from stabq.errors import ConfigError


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
            "fsq-2stage, vq-2stage; the explode baselines vq-ema-sum, vq-ema-tutorial."
        ),
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per method (default: preset's).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per run (default: preset's).")] = None,
    preset: Annotated[
        str,
        typer.Option(
            help="default; stress: lr 3e-2 with guards off, where VQ-EMA collapses; explode: "
            "SGD scenarios where VQ-EMA's loss passes 1e10, guards off then on."
        ),
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
        from stabq.scenarios import SCENARIOS

        if out is not None:  # before the runs, not after them
            require_directory_path(out, ConfigError, "the comparison")
        if tensorboard is not None:  # and not where --out will replace the events
            check_log_dir(tensorboard, outside=out)
        names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        spec = PRESETS.get(preset, PRESETS["default"])
        total = len(names or spec["methods"]) * (seeds or spec["seeds"])
        if preset == "explode":  # each scenario's baseline twice (guards off, on)
            total += 2 * len(SCENARIOS) * (seeds or spec["seeds"])
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

    # explode: one table per scenario and guard setting, in the order they ran
    for section in dict.fromkeys((r.get("scenario"), r.get("guards")) for r in result.rows):
        if section[0] is not None:
            typer.echo(f"\n{section[0]}, guards {'on' if section[1] else 'off'}:")
        rows = [r for r in result.rows if (r.get("scenario"), r.get("guards")) == section]
        typer.echo(format_table(rows))
    typer.echo(result.verdict)
    typer.echo(f"{result.seconds:.0f} s" + (f"; report in {out}" if out is not None else ""))
