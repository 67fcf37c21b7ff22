"""What ``--help`` shows: flags without a type, required options marked, and every list a
user reads (presets, methods) taken from the library, so a new method cannot be left out."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from stabq import preset_names
from stabq.cli import app
from stabq.compare import METHODS, PRESETS

COMMANDS = ["train", "evaluate", "encode", "levels", "compare"]


def help_of(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=["stabq", *COMMANDS])
def test_flags_show_no_type(command):
    text = help_of(*command)
    assert "<bool>" not in text
    assert re.search(r"--help\s+Show this message and exit\.", text)


def test_the_root_lists_every_command_without_cutting_its_line():
    text = help_of()
    assert "--version  Print the version and exit." in text
    for command in COMMANDS:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(command + " "))
        assert not line.rstrip().endswith("..."), line


def test_train_marks_data_and_out_required_unless_resuming():
    flat = " ".join(help_of("train").split())
    for option in ("--data DATA", "--out DIR"):
        after = flat[flat.index(option) + len(option) :]
        own = re.split(r" --(?!resume\])", after)[0]  # its help, up to the next option
        assert own.endswith("[required unless --resume]"), option


def test_train_lists_every_preset():
    flat = " ".join(help_of("train").split()).replace("- ", "-")  # rich wraps at hyphens
    assert f"Preset: {', '.join(preset_names())}." in flat


def test_compare_lists_every_method_and_preset_from_the_library():
    flat = " ".join(help_of("compare").split()).replace("- ", "-")
    assert f"Known: {', '.join(METHODS)}." in flat
    for name in ("simvq", "rfsq", "lfq", "bsq", *PRESETS):
        assert name in flat
    for option in ("--lr LR", "--batch-size N", "--optimizer NAME", "--option KEY=VALUE"):
        assert option in flat
