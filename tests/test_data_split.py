"""The split by row index and the data held once: the rows scikit-learn's
``train_test_split`` picks, int32 row numbers, labels encoded in chunks as ``np.unique``
encodes them whole, and parts that share the loaded array instead of copying it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.model_selection import train_test_split

import stabq
from stabq.data import labels, split
from stabq.data.labeled import LabeledData, from_arrays, train_val_split
from stabq.data.rows import Rows, from_memmap, scan, view_split
from stabq.data.standardize import Standardizer
from stabq.errors import DataError
from stabq.training.batches import ViewReader, on_device


def _reference(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The split as stabq drew it with scikit-learn's train_test_split."""
    n = len(y)
    n_val = min(n - 1, max(1, math.ceil(n * val_fraction - 1e-9)))
    counts = np.bincount(y)
    counts = counts[counts > 0]
    stratify = y if counts.min() >= 2 and min(n_val, n - n_val) >= len(counts) else None
    train, val = train_test_split(np.arange(n), test_size=n_val, random_state=seed,
                                  stratify=stratify)  # fmt: skip
    return np.sort(train), np.sort(val)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 400),
    classes=st.integers(1, 6),
    fraction=st.floats(0.01, 0.95),
    seed=st.integers(0, 2**31 - 1),
    gap=st.integers(1, 3),
)
def test_split_rows_are_train_test_splits_rows(n, classes, fraction, seed, gap):
    y = np.random.default_rng(seed).integers(0, classes, n) * gap  # ids with absent classes
    data = from_arrays(np.arange(n, dtype=np.float32)[:, None], y)
    train, val = train_val_split(data, fraction, seed)
    want_train, want_val = _reference(data.y, fraction, seed)
    assert train.x[:, 0].astype(np.int64).tolist() == want_train.tolist()
    assert val.x[:, 0].astype(np.int64).tolist() == want_val.tolist()
    assert np.array_equal(train.y, data.y[want_train]) and np.array_equal(val.y, data.y[want_val])


def test_split_rows_are_int32_below_2_31_rows(monkeypatch):
    monkeypatch.setattr(split, "CHUNK_ROWS", 7)  # several chunks
    y = np.random.default_rng(0).integers(0, 5, 300)
    for stratify in (True, False):
        train, val = split.split_indices(y, 30, 3, stratify)
        assert train.dtype == val.dtype == np.int32
        assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(300))
    assert split.index_dtype(2**31 - 1) == np.int32 and split.index_dtype(2**31) == np.int64


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=300), st.integers(1, 50))
def test_class_order_in_chunks_is_the_stable_argsort(values, chunk):
    y = np.asarray(values, dtype=np.int64)
    split.CHUNK_ROWS, before = chunk, split.CHUNK_ROWS
    try:
        order = split.class_order(y, np.bincount(y))
    finally:
        split.CHUNK_ROWS = before
    assert np.array_equal(order, np.argsort(y, kind="stable"))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-(2**40), 2**40) | st.sampled_from([0, 1, 7]), min_size=1, max_size=200),
    st.integers(1, 40),
    st.sampled_from(["int64", "int16", "float64", "uint8"]),
)
def test_labels_encoded_in_chunks_as_unique_encodes_them_whole(values, chunk, dtype):
    y = np.asarray(values).astype(dtype)  # narrow types wrap: the same labels either way
    labels.CHUNK_ROWS, before = chunk, labels.CHUNK_ROWS
    try:
        ids, names = labels.encode_labels(y, None, "y", None)
    finally:
        labels.CHUNK_ROWS = before
    unique, inverse = np.unique(y.astype(np.int64), return_inverse=True)
    assert ids.dtype == np.int64 and np.array_equal(ids, inverse.reshape(-1))
    assert names == [str(v) for v in unique.tolist()]


def test_a_label_outside_the_classes_names_its_row_in_a_later_chunk(monkeypatch):
    monkeypatch.setattr(labels, "CHUNK_ROWS", 4)
    y = np.zeros(20, dtype=np.int64)
    y[13] = 5
    with pytest.raises(DataError, match=r"^y: row 13: label '5' is not one of the 1 known"):
        labels.encode_labels(y, ["0"], "y", None)


def test_a_non_finite_value_is_named_in_a_later_chunk(monkeypatch):
    from stabq.data import labeled

    monkeypatch.setattr(labeled, "CHUNK_ROWS", 1)  # 16 values a chunk: 4 rows of 4
    x = np.ones((30, 4), dtype=np.float32)
    x[21, 2] = np.nan
    with pytest.raises(DataError, match=r"^arrays: row 21, column 2: feature value is NaN"):
        from_arrays(x, np.arange(30) % 2)


def _data(n: int = 500, d: int = 6) -> LabeledData:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, n)
    return from_arrays(rng.normal(size=(n, d)).astype(np.float32) + y[:, None], y)


def test_view_split_parts_share_the_loaded_rows():
    data = _data()
    train, val = view_split(data, 0.2, 1)
    copies = train_val_split(data, 0.2, 1)
    for part, copy in zip((train, val), copies, strict=True):
        assert isinstance(part.x, Rows) and part.x.base is data.x and part.x.index.dtype == np.int32
        assert np.array_equal(np.asarray(part.x), copy.x) and np.array_equal(part.y, copy.y)
        reader = on_device(part.x, "cpu")
        assert isinstance(reader, ViewReader)
        assert reader.base.data_ptr() == data.x.ctypes.data  # the array, not a copy of it
        idx = torch.tensor([3, 0, 7, 3])
        assert torch.equal(reader[idx], torch.from_numpy(copy.x)[idx])
        assert torch.equal(reader[2:9], torch.from_numpy(copy.x)[2:9])


def test_arrays_in_memory_give_the_tensor_of_their_memory():
    data = _data()
    assert on_device(data.x, "cpu").data_ptr() == data.x.ctypes.data
    assert np.shares_memory(view_split(data, 0.1, 0)[0].x.base, data.x)


def test_token_ids_are_split_as_copies():
    x = np.random.default_rng(0).integers(1, 9, (40, 5))
    data = from_arrays(x, np.arange(40) % 2)
    train, _ = view_split(data, 0.25, 0)
    assert train.x.dtype == np.int64 and np.array_equal(
        train.x, train_val_split(data, 0.25, 0)[0].x
    )


def test_statistics_of_rows_in_chunks_equal_those_of_the_array(monkeypatch):
    from stabq.data import standardize

    monkeypatch.setattr(standardize, "CHUNK_BYTES", 8 * 6 * 37)  # 37 rows a chunk
    data = _data()
    part = view_split(data, 0.2, 0)[0]
    copy = np.asarray(part.x)
    fitted, scanned = Standardizer.fit(copy), scan(part, (6,))
    assert np.array_equal(fitted.mean, scanned.mean) and np.array_equal(fitted.std, scanned.std)
    np.testing.assert_allclose(fitted.mean, copy.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fitted.std, copy.astype(np.float64).std(0), rtol=1e-6)


def test_memmap_subsets_number_rows_in_int32(tmp_path):
    x = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, (50, 3))
    x[:] = np.arange(150, dtype=np.float32).reshape(50, 3)
    x.flush()
    rows = from_memmap(np.load(tmp_path / "x.npy", mmap_mode="r"), np.arange(50) % 2).x
    part = rows[np.array([4, 9, 30])][1:]
    assert part.index.dtype == np.int32 and part.index.tolist() == [9, 30]
    assert rows[np.arange(50) > 45].index.tolist() == [46, 47, 48, 49]
    assert np.array_equal(part.read(np.array([1, 0])), x[[30, 9]])


def test_training_on_the_shared_rows_equals_training_on_copies():
    data = _data(300)
    config = stabq.TrainConfig(epochs=2, batch_size=64, progress=False, seed=3)
    runs = []
    for parts in (None, train_val_split(data, config.val_fraction, config.seed)):
        torch.manual_seed(0)
        model = stabq.BottleneckClassifier(6, 3, "fsq", hidden=16, bottleneck_dim=8)
        if parts is None:
            result = stabq.train(model, data, config=config)
        else:
            result = stabq.train(model, parts[0], parts[1], config=config)
        runs.append((result.history, [p.detach().clone() for p in model.parameters()]))
    (history_a, weights_a), (history_b, weights_b) = runs
    strip = [{k: v for k, v in row.items() if "second" not in k} for row in history_a]
    assert strip == [{k: v for k, v in row.items() if "second" not in k} for row in history_b]
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))
