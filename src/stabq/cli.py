"""The ``stabq`` command: a thin typer shell over the Python API.

A user error (a :class:`StabqError`) prints one line and exits with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from stabq.errors import StabqError
from stabq.quantizers.registry import FSQ_LEVELS, recommended_levels

app = typer.Typer(
    name="stabq",
    help="Stable discrete bottlenecks for classifiers: train, compare and inspect quantizers.",
    no_args_is_help=True,
    add_completion=False,
)

T = TypeVar("T")


@app.callback()
def _root() -> None:
    """Stable discrete bottlenecks for classifiers: train, compare and inspect quantizers."""


DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks of user errors.")]


def run_user_command(call: Callable[[], T], debug: bool = False) -> T:
    """Run ``call``; a StabqError becomes one line on stderr and exit status 2."""
    try:
        return call()
    except StabqError as err:
        if debug:
            raise
        print(f"stabq: error: {err}", file=sys.stderr)
        raise typer.Exit(code=2) from None


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
    typer.echo(f"{levels_text}\t({math.prod(found)} codes; use: --levels {levels_text})")


def main() -> None:
    """Entry point of ``python -m stabq``."""
    app()
