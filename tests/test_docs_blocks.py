"""Every code block of README.md and the docs runs here, or says why it does not.

The rules, per fenced block:

- ``python``: run as written, each block in a fresh namespace in an empty directory.
- ``sh``: must follow a ``<!-- not run: REASON -->`` line (it trains for minutes, needs
  several machines, ...); its ``stabq`` command lines are still parsed by the command
  line itself, so an option that does not exist, or a value of the wrong type, fails.
- ``text``, ``json``, ``toml``: output or a file's content, shown, not run.
- Any block may be skipped with ``<!-- not run: REASON -->``; the reason cannot be empty.
- A block without a language, or with another one, fails.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<marker><!-- not run: (?P<reason>.*?) -->\n)?```(?P<lang>\S*)\n"
                   r"(?P<body>.*?)^```$", re.S | re.M)  # fmt: skip
SHOWN = {"text", "json", "toml"}


def blocks(page: Path) -> list[tuple[str, str, str | None, int]]:
    """``(language, body, not-run reason or None, line)`` of each fenced block of ``page``."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("lang")) + 1
        reason = match.group("reason") if match.group("marker") else None
        found.append((match.group("lang"), match.group("body"), reason, line))
    return found


def stabq_commands(body: str) -> list[list[str]]:
    """The arguments after ``stabq`` of each command line of a shell block (continuation
    lines joined, comments dropped; ``python -m stabq`` and ``torchrun ... -m stabq`` too)."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for start, word in enumerate(words):
            if word == "stabq" and (start == 0 or words[start - 1] == "-m"):
                commands.append(words[start + 1 :])
                break
    return commands


def parse(arguments: list[str]) -> None:
    """Parse ``arguments`` as ``stabq`` would, down to the command, without running it."""
    import typer

    from stabq.cli import app

    group = typer.main.get_command(app)
    context = group.make_context("stabq", list(arguments), resilient_parsing=False)
    # the command's name: click keeps it apart from the rest (``_protected_args`` since 8.2)
    named = getattr(context, "_protected_args", None) or getattr(context, "protected_args", [])
    rest = [*named, *context.args]
    if rest:
        name, command, remaining = group.resolve_command(context, rest)
        command.make_context(name, remaining, parent=context)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_runs_or_says_why_not(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for lang, body, reason, line in blocks(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        assert reason is None or reason.strip(), f"{where}: a not-run mark needs a reason"
        if lang in ("sh", "bash"):
            assert reason, f"{where}: a shell block needs <!-- not run: REASON --> before it"
            for arguments in stabq_commands(body):
                try:
                    parse(arguments)
                except Exception as error:  # click's usage errors and exits
                    pytest.fail(f"{where}: stabq {shlex.join(arguments)}: {error!r}")
        elif lang == "python":
            if reason is None:
                exec(compile(body, where, "exec"), {"__name__": "__docs__"})
        else:
            assert lang in SHOWN, f"{where}: a block in {lang or 'no language'!r}"


def test_the_rules_catch_what_they_must(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- not run: trains for an hour -->\n```sh\nstabq compare --bogus 1\n```\n")
    (lang, body, reason, _), = blocks(page)  # fmt: skip
    assert (lang, reason) == ("sh", "trains for an hour")
    (arguments,) = stabq_commands(body)
    with pytest.raises(Exception, match="bogus"):
        parse(arguments)
    parse(["compare", "--preset", "quick", "--seeds", "2"])
    assert stabq_commands("torchrun --nproc_per_node=2 -m stabq train \\\n  --data x # c\n") == [
        ["train", "--data", "x"]
    ]
    page.write_text("```sh\nmake test\n```\n")
    assert blocks(page)[0][2] is None  # unmarked: the test above fails on it
