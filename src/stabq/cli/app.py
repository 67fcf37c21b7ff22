"""The ``stabq`` app: its shared options, the one-line handling of user errors, ``main``.

A user error (a :class:`StabqError`) prints one line and exits with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from stabq.errors import ConfigError, StabqError

app = typer.Typer(
    name="stabq",
    help="Stable discrete bottlenecks for classifiers: train, compare and inspect quantizers.",
    no_args_is_help=True,
    add_completion=False,
    # plain click help: typer's rich panels label every flag ``<bool>`` and every option
    # with its Python type
    rich_markup_mode=None,
)

T = TypeVar("T")
DATA_HELP = (
    "A built-in dataset (mnist1d, digits, digits:images, synthetic, synthetic:DIM, tokens) or "
    "a file: .npz (arrays x, y, and lengths for padded token ids; x of any rank (N, ...), "
    "uint8 images scaled to [0, 1], other integers kept as token ids), .pt / .safetensors "
    "(tensors x, y), .csv / .parquet (label column 'label', else the last)."
)
ENCODER_HELP = (
    "mlp (feature rows), cnn1d (sequences (N, L) or (N, C, L)), cnn2d (images (N, C, H, W)), "
    "transformer or bag (token ids (N, L)), or package.module:factory, a callable "
    "(input_shape, out_dim) -> torch.nn.Module."
)
EncoderOption = Annotated[str, typer.Option("--encoder", help=ENCODER_HELP, metavar="ENCODER")]
TRUST_HELP = (
    "Load a model whose encoder is a user factory (package.module:factory): that module is "
    "imported and run, so only for a model whose source you trust. Built-in encoders, and "
    "models this same process saved, need no flag."
)
TrustOption = Annotated[bool, typer.Option("--trust-encoder", help=TRUST_HELP)]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks of user errors.")]
DataOption = Annotated[
    str, typer.Option("--data", help=DATA_HELP, metavar="DATA", show_default=False)
]
TensorBoardOption = Annotated[
    Path | None,
    typer.Option(help="Write TensorBoard events to DIR, epoch by epoch.", metavar="DIR"),
]
PartOption = Annotated[
    str, typer.Option(help="Which part of a built-in dataset: train, test or all.")
]


def _show_version(value: bool) -> None:
    if value:
        from stabq._version import __version__

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


def load_model(directory: Path, trust_encoder: bool) -> Any:
    """:func:`stabq.load` for a command: a refused user encoder names ``--trust-encoder``."""
    from stabq.errors import UntrustedEncoderError
    from stabq.model.saving import load
    from stabq.model.trust import CLI_HINT

    try:
        return load(directory, trust_encoder=trust_encoder)
    except UntrustedEncoderError as err:
        raise err.hinting(CLI_HINT) from None


def parse_options(pairs: list[str], example: str = "levels=[8,5,5,5]") -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each VALUE read as JSON when it parses (``levels=[8,5,5,5]``);
    ``example`` is shown when a pair has no ``=``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE, e.g. {example}")
        try:
            options[key] = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            options[key] = raw
    return options


# the options of `stabq train` a checkpoint records, so that --resume DIR can repeat them


def under_torchrun(call: Callable[[], T]) -> T:
    """Run ``call`` inside the process group torchrun's environment describes, if any."""
    from stabq.distributed import process_group_from_env

    with process_group_from_env():
        return call()


def main() -> None:
    """Entry point of ``python -m stabq``.

    A usage error (an unknown option, a value of the wrong type, a missing
    option) is one line and exit status 2 too, like every other user error.
    """
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as err:  # click's usage errors, raised when not standalone
        if type(err).__name__ == "NoArgsIsHelpError":  # plain `stabq`: the help, status 2
            print(err.ctx.get_help())
        else:
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
