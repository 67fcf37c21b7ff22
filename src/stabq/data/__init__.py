"""Data, from its sources to checked :class:`LabeledData`; no torch here.

The walk goes one way: :mod:`~stabq.data.messages` and :mod:`~stabq.data.ids` (token
ids) at the bottom, :mod:`~stabq.data.labeled` (types and checks),
:mod:`~stabq.data.standardize` (one Standardizer), the sources on top of them
(:mod:`~stabq.data.builtin` datasets, :mod:`~stabq.data.readers` for files,
:mod:`~stabq.data.rows` for memory-mapped and Dataset rows), and
:mod:`~stabq.data.load`, the one module that knows every source. The trainer's torch
batches live in :mod:`stabq.training.batches`.
"""

from stabq.data.builtin import BUILTIN_DATASETS, DIGIT_CLASSES, builtin_arrays
from stabq.data.ids import is_ids, vocab_of
from stabq.data.labeled import (
    DataError,
    LabeledData,
    from_arrays,
    require_classes,
    require_fit,
    train_val_split,
    validate_features,
    with_classes,
)
from stabq.data.load import PARTS, load_data
from stabq.data.readers import FILE_EXTENSIONS
from stabq.data.standardize import Standardizer

__all__ = [
    "BUILTIN_DATASETS", "DIGIT_CLASSES", "FILE_EXTENSIONS", "PARTS", "DataError",
    "LabeledData", "Standardizer", "builtin_arrays", "from_arrays", "is_ids", "load_data",
    "require_classes", "require_fit", "train_val_split", "validate_features", "vocab_of",
    "with_classes",
]  # fmt: skip
