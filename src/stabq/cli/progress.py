"""Progress of a command that trains many runs: a bar on a terminal, lines in a log.

A bar redraws in place, which a log file or a CI page cannot show: there it
stays silent for minutes. When standard error is not a terminal, each finished
run prints one line instead (``compare: run 3/10 fsq seed 0: test acc 71.2%, 12 s``),
and the first line, once the data is loaded, says how many runs will come.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class RunProgress:
    """Counts finished runs: a tqdm bar on a terminal, else a line a run on ``stream``.

    Args:
        quiet: show nothing.
        stream: where lines go (standard error by default); a bar when it is a terminal.
    Attributes:
        epoch_bars: what to pass as ``progress`` to each run's training: None (per-epoch
            bars, shown on a terminal only) or False (quiet, or lines instead of bars).

    Example::

        with RunProgress(quiet=False) as progress:
            compare(..., on_start=progress.start, on_run=progress.update,
                    progress=progress.epoch_bars)
    """

    def __init__(self, quiet: bool, stream: TextIO | None = None) -> None:
        self.total, self.quiet, self.done = 0, quiet, 0
        self.stream = stream if stream is not None else sys.stderr
        self.lines = not quiet and not _is_terminal(self.stream)
        self.epoch_bars = False if quiet or self.lines else None
        self.bar: Any = None
        self.started = time.perf_counter()

    def __enter__(self) -> RunProgress:
        return self

    def start(self, total: int) -> None:
        """The data is loaded and checked, ``total`` runs are about to train."""
        self.total = total
        if self.lines:
            self._say(f"compare: {total} runs; a line as each ends")
        elif not self.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="compare", unit="run", file=self.stream)

    def update(self, record: dict[str, Any]) -> None:
        """One run ended: ``record`` is its compare record (method, seed, figures)."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(method=record["method"], seed=record["seed"])
        elif self.lines:
            self._say(_line(record, self.done, self.total, time.perf_counter() - self.started))

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _line(record: dict[str, Any], done: int, total: int, elapsed: float) -> str:
    where = f", {record['scenario']}" if record.get("scenario") else ""
    if record.get("diverged"):
        outcome = "diverged"
    else:
        outcome = f"test acc {100 * record.get('test_accuracy', float('nan')):.1f}%"
    return (
        f"compare: run {done}/{total} {record['method']} seed {record['seed']}{where}: "
        f"{outcome}, {record.get('seconds', 0.0):.0f} s ({elapsed:.0f} s so far)"
    )


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


__all__ = ["RunProgress"]
