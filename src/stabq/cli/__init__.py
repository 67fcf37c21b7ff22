"""The ``stabq`` command: a thin typer shell over the Python API.

A user error (a :class:`StabqError`) prints one line and exits with status 2;
``--debug`` shows the traceback instead. One file per command (group): ``train``,
``evaluate`` / ``encode`` / ``levels``, and ``compare``; ``app`` holds what they share.
"""

# the commands register on the app in this order, the order --help lists them
from stabq.cli import train_command  # noqa: I001, F401
from stabq.cli import model_commands  # noqa: F401
from stabq.cli import compare_command  # noqa: F401
from stabq.cli.app import app, main, parse_options, run_user_command

__all__ = ["app", "main", "parse_options", "run_user_command"]
