"""What a user reads speaks of the product alone: README, the docs, the changelog, every
docstring and message in the package, and the command line's help hold no word of how
the project is developed (its rounds of work, its tracker, its working notes, paths
outside the repository)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from stabq.cli import app

ROOT = Path(__file__).resolve().parents[1]
PROCESS = re.compile(
    r"\b(this|last|next|earlier) stop\b|\bstops? \d+\b|\bissues? #?\d+\b|"
    r"\bI (tried|could|measured|think|guess|chose)\b|\bwe tried\b|\.\./shared|/work/|"
    r"\bDESIGN\.md\b|\bnot_drawn\b|\bsessions?\b",
    re.IGNORECASE,
)
TEXTS = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "src" / "stabq").rglob("*.py")),
]


def offending(text: str) -> list[str]:
    return [m.group(0) for m in PROCESS.finditer(text)]


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_word_of_the_development_process(path):
    assert offending(path.read_text()) == []


def test_the_command_line_help_holds_none_either():
    runner = CliRunner()
    group = typer.main.get_command(app)
    commands = [[]] + [[name] for name, c in group.commands.items() if not c.hidden]
    assert len(commands) > 4  # the group and its commands, read from the app
    for args in commands:
        result = runner.invoke(app, [*args, "--help"], terminal_width=100)
        assert result.exit_code == 0, result.output
        assert offending(result.output) == [], args


def test_the_pattern_catches_what_it_is_for():
    caught = "as this stop showed; see issue 14; I tried lr 1e-2; ../shared/DESIGN.md"
    assert len(offending(caught)) == 5
    assert offending("training stops when the validation accuracy stops improving") == []
