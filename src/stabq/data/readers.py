"""Getting features and labels out of data files, one reader per format.

``read_file(path)`` returns the raw ``(x, y, columns)`` of a ``.npz``,
``.pt``, ``.safetensors``, ``.csv`` or ``.parquet`` file (``columns``: the
feature column names of a table, ``None`` for arrays); :mod:`stabq.data`
validates them. Whatever a third-party reader raises on a missing,
truncated or corrupted file becomes one :class:`DataError` naming the file,
and its warnings stay off the user's terminal. Nothing is unpickled: ``.npz``
loads with ``allow_pickle=False`` and ``.pt`` with torch's ``weights_only``
loader, which builds tensors and plain containers and refuses every other
object, so a pickle's ``__reduce__`` never runs.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stabq.data.builtin import BUILTIN_DATASETS
from stabq.data.labeled import Columns, as_numpy, data_error, where
from stabq.errors import DataError

FILE_EXTENSIONS: tuple[str, ...] = (".npz", ".pt", ".safetensors", ".csv", ".parquet")
Raw = tuple[np.ndarray, np.ndarray, Columns]


def _from_mapping(obj: Any, source: str) -> Raw:
    if not isinstance(obj, Mapping):
        raise data_error(source, f"expected a dict with 'x' and 'y', found {type(obj).__name__}")
    for key in ("x", "y"):
        if key not in obj:
            found = ", ".join(map(str, obj)) or "none"
            raise data_error(source, f"no entry {key!r} (found: {found})")
    return as_numpy(obj["x"], source, "x"), as_numpy(obj["y"], source, "y"), None


def _read_npz(path: Path, source: str) -> Raw:
    with open(path, "rb") as fh:  # ours to close, whatever np.load raises
        obj = np.load(fh, allow_pickle=False)  # an object array raises: nothing is unpickled
        if not isinstance(obj, np.lib.npyio.NpzFile):
            raise data_error(source, "holds one array, expected an .npz archive with 'x' and 'y'")
        with obj:
            for key in ("x", "y", "lengths"):
                if key in obj.files:
                    _refuse_objects(obj, key, source)
            x, y, columns = _from_mapping(obj, source)
            if "lengths" in obj.files:
                x = padded(x, as_numpy(obj["lengths"], source, "lengths"), source)
            return x, y, columns


def padded(x: np.ndarray, lengths: np.ndarray, source: str, pad_id: int = 0) -> np.ndarray:
    """Token ids ``x`` ``(n, L)`` with every position at or past row ``i``'s length
    ``lengths[i]`` set to ``pad_id``: variable-length sequences given as one array and
    their lengths. Lengths that are not ``n`` integers in ``[0, L]`` are a DataError."""
    if x.ndim != 2 or x.dtype.kind not in "iu":
        raise data_error(source, f"'lengths' goes with token ids x of shape (n, L), found "
                         f"{x.dtype} x of shape {x.shape}")  # fmt: skip
    if lengths.shape != (len(x),) or lengths.dtype.kind not in "iu":
        raise data_error(source, f"'lengths' must be {len(x)} integers (one a row), found "
                         f"{lengths.dtype} of shape {lengths.shape}")  # fmt: skip
    bad = np.flatnonzero((lengths < 0) | (lengths > x.shape[1]))
    if bad.size:
        raise data_error(source, f"row {int(bad[0])}: length {int(lengths[bad[0]])}, allowed "
                         f"is 0 to {x.shape[1]} (the width of x)")  # fmt: skip
    x = np.array(x, dtype=np.int64)
    x[np.arange(x.shape[1]) >= lengths[:, None]] = pad_id
    return x


def _refuse_objects(npz: np.lib.npyio.NpzFile, key: str, source: str) -> None:
    """An object array (strings from pandas, say) would need pickle: say how to save it.

    Only the member's ``.npy`` header is read, never its data.
    """
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    try:
        with npz.zip.open(f"{key}.npy") as member:
            read = readers.get(fmt.read_magic(member))
            if read is None:
                return  # another header version: np.load's own check still refuses objects
            _, _, dtype = read(member)
    except Exception:
        return  # a damaged member: reading it says so, in _from_mapping
    if dtype.hasobject:
        fix = "y.astype(str)" if key == "y" else "x.astype(np.float32)"
        raise data_error(
            source,
            f"{key!r} is an object array (what pandas' .to_numpy() gives for text columns); "
            f"loading it would need pickle, which stabq never runs: save it as {fix}",
        )


def _read_tensors(path: Path, source: str) -> Raw:
    if path.suffix.lower() == ".pt":
        import torch

        return _from_mapping(torch.load(path, map_location="cpu", weights_only=True), source)
    from safetensors.torch import load_file  # torch, not numpy: bfloat16 is allowed

    return _from_mapping(load_file(path), source)


def _read_table(path: Path, source: str) -> Raw:
    """Feature columns and the label column (``label``, else the last) of a CSV or Parquet file."""
    import pandas as pd

    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path, low_memory=False)
    else:
        df = pd.read_parquet(path, engine="pyarrow")
    names = [str(c) for c in df.columns]
    if len(names) < 2:
        raise data_error(source, f"needs feature columns and a label column, found columns {names}")
    if len(df) == 0:
        raise data_error(source, "no rows (a header but no data)")
    label_pos = names.index("label") if "label" in names else len(names) - 1
    feature_pos = [i for i in range(len(names)) if i != label_pos]
    columns = [names[i] for i in feature_pos]
    for j, pos in enumerate(feature_pos):
        col = df.iloc[:, pos]
        if not pd.api.types.is_numeric_dtype(col):
            bad = (pd.to_numeric(col, errors="coerce").isna() & col.notna()).to_numpy()
            row = int(np.argmax(bad))
            found = f": {where(row, columns)} holds {col.iloc[row]!r}" if bad.any() else ""
            raise data_error(source, f"column {columns[j]!r} is not numeric{found}")
    x = df.iloc[:, feature_pos].to_numpy(dtype=np.float64, na_value=np.nan)
    label = df.iloc[:, label_pos]
    missing = label.isna().to_numpy()
    if missing.any():
        raise data_error(source, f"{where(int(np.argmax(missing)), columns)}: label is missing")
    if pd.api.types.is_bool_dtype(label) or pd.api.types.is_integer_dtype(label):
        return x, label.to_numpy(dtype=np.int64), columns
    if pd.api.types.is_float_dtype(label):
        return x, label.to_numpy(dtype=np.float64), columns
    return x, label.to_numpy(dtype=object), columns


READERS: dict[str, Callable[[Path, str], Raw]] = {
    ".npz": _read_npz, ".pt": _read_tensors, ".safetensors": _read_tensors,
    ".csv": _read_table, ".parquet": _read_table,
}  # fmt: skip


def _detail(exc: BaseException) -> str:
    """What a reader's exception says, in one line: its first sentence, not its advice
    (torch's advice is to unpickle); a CSV parser error keeps the line it names."""
    text = " ".join(str(exc).split())
    if type(exc).__name__ != "ParserError":
        text = text.split(". ")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ignore_reader_warnings() -> None:
    """Readers' warnings (torch on pickle protocols, pandas on dtypes, numpy on casts) are
    not the user's business: the result is validated, and a problem is an error. Call it
    inside ``warnings.catch_warnings()``; ResourceWarning stays as configured."""
    import pandas as pd

    for category in (
        UserWarning, FutureWarning, DeprecationWarning, RuntimeWarning,
        pd.errors.DtypeWarning, pd.errors.ParserWarning,
    ):  # fmt: skip
        warnings.filterwarnings("ignore", category=category)


def read_file(path: Path) -> Raw:
    """The raw ``(x, y, columns)`` of a data file, or a :class:`DataError` naming it."""
    source = str(path)
    ext = path.suffix.lower()
    if ext not in READERS:
        raise data_error(
            source, f"unknown data format {ext or '(no extension)'!r}: expected a file ending in "
            f"{', '.join(FILE_EXTENSIONS)}, an x.npy with y.npy beside it or a built-in dataset "
            f"({', '.join(BUILTIN_DATASETS)}, synthetic:DIM)",
        )  # fmt: skip
    if not path.exists():
        raise data_error(source, "no such file")
    if not path.is_file():
        raise data_error(source, "is not a file (a directory?)")
    if path.stat().st_size == 0:
        raise data_error(source, "file is empty: no rows")
    try:
        with warnings.catch_warnings():
            _ignore_reader_warnings()
            return READERS[ext](path, source)
    except DataError:
        raise
    except Exception as exc:  # whatever the third-party reader raises; KeyboardInterrupt passes
        refused = isinstance(exc, pickle.UnpicklingError)  # weights_only met a non-tensor
        hint = " (only tensors load: save {'x': tensor, 'y': tensor})" if refused else ""
        raise data_error(source, f"cannot read as a {ext} file: {_detail(exc)}{hint}") from exc


__all__ = ["FILE_EXTENSIONS", "READERS", "as_numpy", "data_error", "read_file", "where"]
