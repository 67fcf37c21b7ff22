"""MkDocs hook: fills ``reference/cli.md`` with the ``--help`` of ``stabq`` and of each of
its commands, read from the typer app itself (no subprocess), so the page follows the code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

PAGE = "reference/cli.md"
MARKER = "<!-- cli-help -->"
WIDTH = 88  # a fixed width: the page does not depend on the terminal that builds it
SRC = Path(__file__).resolve().parents[2] / "src"


def help_sections(command: Any, name: str, parent: Any = None) -> list[str]:
    """A heading and the help text of ``command``, then the same for each of its visible
    subcommands, in the order ``--help`` lists them.

    Duck-typed on click's API: recent typer releases carry their own copy of click
    (``typer._click``), whose classes are not ``click``'s.
    """
    ctx = command.context_class(
        command, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH
    )
    level = "#" * min(2 + (ctx.command_path.count(" ")), 4)
    sections = [f"{level} `{ctx.command_path}`\n\n```text\n{ctx.get_help()}\n```\n"]
    if hasattr(command, "list_commands"):  # a group
        for sub_name in command.list_commands(ctx):
            sub = command.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                sections += help_sections(sub, sub_name, ctx)
    return sections


def cli_reference() -> str:
    if str(SRC) not in sys.path:  # a build from a checkout without stabq installed
        sys.path.insert(0, str(SRC))
    import typer

    from stabq.cli import app

    return "\n".join(help_sections(typer.main.get_command(app), "stabq", None))


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} has no {MARKER} line for the command reference")
    return markdown.replace(MARKER, cli_reference())
