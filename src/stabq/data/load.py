"""``load_data``: the one module that knows every source of data, built-in or a file.

``load_data(spec, part)`` takes a built-in name (``mnist1d``, ``digits``, ``digits:images``,
``synthetic[:DIM]``, generated locally; ``part`` train, test or all) or a file (``.npz``,
``.pt``, ``.safetensors``, ``.csv``, ``.parquet``, read whole by :mod:`stabq.data.readers`;
``.npy`` pairs, memory-mapped by :mod:`stabq.data.rows`) and returns checked
:class:`~stabq.data.labeled.LabeledData`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stabq.data.builtin import BUILTIN_DATASETS, DIGIT_CLASSES, builtin_arrays, builtin_classes
from stabq.data.labeled import LabeledData, build_labeled, data_error
from stabq.data.readers import FILE_EXTENSIONS, read_file
from stabq.data.rows import open_npy

PARTS: tuple[str, ...] = ("train", "test", "all")


def load_file(path: Path, classes: Sequence[str] | None) -> LabeledData:
    if path.suffix.lower() == ".npy" or (path.is_dir() and path.suffix not in FILE_EXTENSIONS):
        return open_npy(path, classes)  # memory-mapped
    x, y, columns = read_file(path)
    return build_labeled(x, y, classes, str(path), columns)


def load_data(
    spec: str | os.PathLike[str], part: str = "train", classes: list[str] | None = None
) -> LabeledData:
    """Load a built-in dataset or a data file as checked `LabeledData`.

    Built-ins, generated locally (no download): `mnist1d` (rows of 40 values, 4,000
    to train and 1,000 to test), `digits` (scikit-learn's
    8 x 8 digits as 64 features), `digits:images` (the same rows as `(1, 8, 8)`
    images) and `synthetic` (a 10-class Gaussian mixture of 128 features;
    `synthetic:DIM` for `DIM` features). A file holds features and labels: `.npz`
    (arrays `x` and `y`), `.pt` or `.safetensors` (tensors `x` and `y`), `.csv` or
    `.parquet` (feature columns and a `label` column, else the last), or a directory
    with `x.npy` and `y.npy`, memory-mapped and read per batch. Nothing is unpickled.

    Args:
        spec: a built-in name or a file path.
        part: for a built-in, `"train"`, `"test"` or `"all"`; a file is read whole.
        classes: class names that fix the label -> id mapping (a saved model's);
            default None: the sorted distinct labels.

    Returns:
        `LabeledData`: `x (n, ...)` float32 (int64 token ids for integer data, and the
            built-in `tokens`), `y (n,)` int64 class ids, `classes`.

    Raises:
        DataError: an empty name, an unknown part, a file missing, unreadable or
            malformed, invalid values, or labels outside `classes`.

    Examples:
        >>> from stabq.data import load_data
        >>> data = load_data("synthetic:16", "test")
        >>> data.x.shape, data.x.dtype, data.y.dtype, data.num_classes
        ((1000, 16), dtype('float32'), dtype('int64'), 10)
    """
    spec = os.fspath(spec)
    if not spec.strip():
        raise data_error(
            "data", f"no name given: a file or a built-in ({', '.join(BUILTIN_DATASETS)})"
        )
    if part not in PARTS:
        raise data_error(spec, f"unknown part {part!r}; allowed: {', '.join(PARTS)}")
    arrays = builtin_arrays(spec)
    if arrays is None:
        return load_file(Path(spec), classes)
    x_tr, y_tr, x_te, y_te = arrays
    x, y = {  # copies: the cached arrays stay as generated
        "train": (x_tr.copy(), y_tr.copy()), "test": (x_te.copy(), y_te.copy()),
        "all": (np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])),
    }[part]  # fmt: skip
    names = builtin_classes(spec)
    if names is not DIGIT_CLASSES:  # labels by name: "ABC", ...
        y = np.asarray(names)[y]
    return build_labeled(x, y, names if classes is None else classes, f"{spec}:{part}")


__all__ = ["PARTS", "load_data", "load_file"]
