"""Writing files so that a crash never leaves half of them.

``atomic_directory(target)`` yields an empty temporary directory beside
``target``; when the block ends normally, every file in it has been fsynced
and the directory is renamed over ``target`` (the previous one is put back if
that rename fails). When the block raises, the temporary directory is removed
and ``target`` is untouched. ``write_text`` fsyncs; ``write_npy`` and
``write_chunks`` write a temporary file, fsync it and rename it over the target;
``AppendLog`` appends lines, each flushed. A failed write is one ``StabqError``
naming the path, and no clean-up after a failure raises in its place.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from stabq.errors import StabqError


def umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    """fsync an already written file and give it the umask's permissions."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(path, 0o666 & ~umask())


def require_directory_path(
    target: Path, error: type[StabqError] = StabqError, what: str = "the files"
) -> None:
    """``target`` is a directory or does not exist yet, and no part of its parent is a file."""
    found = next((p for p in (target, *target.parents) if p.exists()), None)
    if found is not None and not found.is_dir():
        where = "exists" if found == target else f"is inside {found}, which exists"
        raise error(
            f"{target}: {where} and is not a directory; {what} must be written to a directory: "
            f"give a new path or an existing directory"
        )


def swap_into_place(tmp: Path, target: Path, error: type[StabqError] = StabqError) -> None:
    """Rename directory ``tmp`` over ``target``; on failure the previous ``target`` stays
    (or, where it cannot be put back, the ``error`` says where it is kept whole)."""
    require_directory_path(target, error)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException as err:
            try:
                os.rename(old, target)  # put the previous one back
            except OSError as undo:
                reason = getattr(err, "strerror", None) or type(err).__name__
                raise error(
                    f"{target}: cannot replace it ({reason}), nor put the previous one back "
                    f"({undo.strerror}): it is kept whole at {old}"
                ) from None
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(
    target: Path, error: type[StabqError] = StabqError, what: str = "the files"
) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` when the block succeeds.

    An ``OSError`` (disk full, read-only, no permission) becomes one
    ``error`` naming ``target``; nothing is left behind either way.
    """
    require_directory_path(target, error, what)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; follow the umask instead
    except OSError as err:
        raise error(f"{target}: cannot write {what} there ({err.strerror})") from None
    try:
        yield tmp
        swap_into_place(tmp, target, error)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error(f"{target}: cannot write {what} ({err.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class AppendLog:
    """A text file of lines, each written and flushed at once (a run's ``metrics.jsonl``).

    ``lines``: None appends to ``path``; a sequence replaces what it held with them first.
    Opening or writing that fails (a read-only directory, a full disk) raises one ``error``
    naming ``path``; :meth:`close` never raises, since every line was flushed when written,
    so an error on its way out of a run is never replaced by the log's.
    """

    def __init__(
        self,
        path: str | Path,
        error: type[StabqError] = StabqError,
        what: str = "the lines",
        lines: Iterable[str] | None = None,
    ) -> None:
        self.path, self.error, self.what = Path(path), error, what
        try:
            self._file = open(self.path, "a" if lines is None else "w", encoding="utf-8")  # noqa: SIM115
        except OSError as err:
            raise error(f"{self.path}: cannot write {what} there ({err.strerror})") from None
        for line in lines or ():
            self.write(line)

    def write(self, line: str) -> None:
        """Append ``line`` and a newline, flushed."""
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as err:
            raise self.error(f"{self.path}: cannot write {self.what} ({err.strerror})") from None

    def close(self) -> None:
        """Close the file (quietly: nothing is left unwritten)."""
        with contextlib.suppress(OSError):
            self._file.close()


def write_npy(
    path: Path, array: np.ndarray, error: type[StabqError] = StabqError, what: str = "the array"
) -> None:
    """Write ``array`` to ``path`` (.npy, no pickle) atomically, through :func:`write_chunks`
    (the array is serialised inside it, so a failure there also leaves nothing behind)."""

    def chunks() -> Iterator[bytes]:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        yield buffer.getvalue()

    write_chunks(path, chunks(), error, what)


def write_chunks(
    path: Path,
    chunks: Iterable[bytes],
    error: type[StabqError] = StabqError,
    what: str = "the file",
) -> None:
    """Write ``chunks`` to ``path`` via a temporary file beside it, fsync and rename.

    A crash at any moment leaves the previous ``path`` (or none) and at most a
    stray ``.NAME.*`` temporary file; an ``OSError`` (disk full, read-only)
    removes the temporary file and becomes one ``error`` naming ``path``.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise error(f"{path}: cannot write {what} there ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as err:
        with contextlib.suppress(OSError):  # gone, or a directory turned read-only: the
            os.unlink(tmp)  # error to raise is the write's, not this cleanup's
        if isinstance(err, OSError):
            raise error(f"{path}: cannot write {what} ({err.strerror})") from None
        raise
