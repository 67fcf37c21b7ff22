"""Data: built-in datasets, every file format, every validation error, splits, scaling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import stabq.datasets as datasets_module
from bad_input import write
from stabq.data import (
    BUILTIN_DATASETS,
    LabeledData,
    Standardizer,
    from_arrays,
    load_data,
    train_val_split,
)
from stabq.errors import DataError, StabqError

EXTENSIONS = (".npz", ".pt", ".safetensors", ".csv", ".parquet")
DIGITS = [str(i) for i in range(10)]
RNG = np.random.default_rng(7)
X = RNG.standard_normal((30, 5)).astype(np.float32)
Y = RNG.integers(0, 4, 30)
H = "(0-based, header excluded)"  # how CSV and Parquet rows are counted in messages
pytestmark = [  # a file left open by a failed read is a failure too
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]


def expect_error(path: Path | str, fragment: str, **kwargs) -> str:
    """``load_data(path)`` fails with one line that starts with the path and holds ``fragment``."""
    with pytest.raises(DataError) as excinfo:
        load_data(path, **kwargs)
    text = str(excinfo.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and fragment in text, text
    return text


@pytest.mark.parametrize(
    "spec, part, shape",
    [
        ("mnist1d", "train", (4000, 40)),
        ("mnist1d", "test", (1000, 40)),
        ("mnist1d", "all", (5000, 40)),
        ("digits", "train", (1437, 64)),
        ("digits", "test", (360, 64)),
        ("synthetic", "train", (4000, 128)),
        ("synthetic", "test", (1000, 128)),
        ("synthetic:16", "train", (4000, 16)),
    ],
)
def test_builtin_shapes_types_and_determinism(spec, part, shape):
    data = load_data(spec, part)
    assert data.x.shape == shape and data.x.dtype == np.float32 and data.x.flags.c_contiguous
    assert data.y.shape == shape[:1] and data.y.dtype == np.int64
    assert data.classes == DIGITS and data.num_classes == 10 and data.num_features == shape[1]
    assert data.source == f"{spec}:{part}" and len(data) == shape[0]
    assert np.unique(data.y).tolist() == list(range(10))
    y = data.y.copy()
    data.x[:] = 0  # the caller's copy: the next load is unchanged
    again = load_data(spec, part)
    assert np.array_equal(again.x, load_data(spec, part).x) and np.array_equal(again.y, y)
    assert np.abs(again.x).sum() > 0


def test_mnist1d_leaves_numpy_global_rng_untouched():
    datasets_module._mnist1d.cache_clear()  # make it generate again
    np.random.seed(1234)
    expected = np.random.random(3)
    np.random.seed(1234)
    load_data("mnist1d", "test")
    assert np.array_equal(np.random.random(3), expected)


def test_all_is_train_then_test_and_digits_is_a_stratified_80_20_split():
    from sklearn.datasets import load_digits

    train, test, every = (load_data("digits", p) for p in ("train", "test", "all"))
    assert np.array_equal(every.x, np.concatenate([train.x, test.x]))
    assert np.array_equal(every.y, np.concatenate([train.y, test.y]))
    raw_x, raw_y = load_digits(return_X_y=True)
    assert sorted(map(bytes, every.x)) == sorted(map(bytes, raw_x.astype(np.float32)))
    assert np.all(np.abs(np.bincount(test.y) - np.bincount(raw_y) * 0.2) <= 1)
    reversed_ = load_data("digits", "test", classes=DIGITS[::-1])  # ids follow the given order
    assert np.array_equal(reversed_.y, 9 - test.y) and reversed_.classes == DIGITS[::-1]


@pytest.mark.parametrize("spec", ["synthetic", "synthetic:16"])
def test_synthetic_is_learnable_but_not_trivial(spec):
    train, test = load_data(spec), load_data(spec, "test")
    centroids = np.stack([train.x[train.y == k].mean(0) for k in range(10)])
    guess = ((test.x[:, None, :] - centroids) ** 2).sum(-1).argmin(1)  # a linear classifier
    assert 0.8 < (guess == test.y).mean() < 0.97  # 0.94 and 0.89; chance is 0.1


@pytest.mark.parametrize(
    "spec, part, fragment",
    [
        ("mnist1d", "tset", "unknown part 'tset'; allowed: train, test, all"),
        ("synthetic:1", "train", "synthetic:DIM needs an integer DIM >= 2, found '1'"),
        ("synthetic:abc", "train", "found 'abc'"),
        ("digits:test", "train", "digits takes no option"),
    ],
)
def test_builtin_bad_spec_or_part(spec, part, fragment):
    expect_error(spec, fragment, part=part)


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_every_format_round_trips_x_and_y_exactly(tmp_path, ext):
    data = load_data(write(tmp_path / f"d{ext}", X, Y), part="test")  # part ignored for files
    assert isinstance(data, LabeledData) and data.source == str(tmp_path / f"d{ext}")
    assert np.array_equal(data.x, X) and data.x.dtype == np.float32
    assert np.array_equal(data.y, Y) and data.classes == ["0", "1", "2", "3"]


@pytest.mark.parametrize("ext", [".npz", ".csv", ".parquet"])
def test_string_labels_get_sorted_ids_or_the_given_order(tmp_path, ext):
    path = write(tmp_path / f"s{ext}", X[:4], np.array(["dog", "cat", "dog", "bird"]))
    data = load_data(path)
    assert data.classes == ["bird", "cat", "dog"] and data.y.tolist() == [2, 1, 2, 0]
    given_ = load_data(path, classes=["dog", "cat", "bird", "fish"])
    assert given_.classes == ["dog", "cat", "bird", "fish"] and given_.y.tolist() == [0, 1, 0, 2]


def test_integer_labels_keep_their_values_as_class_names(tmp_path):
    data = load_data(write(tmp_path / "i.pt", X[:4], np.array([10, 2, -1, 2])))
    assert data.classes == ["-1", "2", "10"] and data.y.tolist() == [2, 1, 0, 1]
    assert load_data(tmp_path / "i.pt", classes=["10", "2", "-1"]).y.tolist() == [0, 1, 2, 1]
    whole = from_arrays(X[:3], np.array([1.0, 3.0, 1.0]))  # whole floats are integers
    assert whole.classes == ["1", "3"] and whole.y.tolist() == [0, 1, 0]
    mixed = from_arrays(X[:3], np.array([10, 2, 1.0], dtype=object))  # sorted as numbers
    assert mixed.classes == ["1", "2", "10"] and mixed.y.tolist() == [2, 1, 0]
    data = from_arrays(torch.ones(3, 2, dtype=torch.bfloat16, requires_grad=True), torch.arange(3))
    assert data.x.dtype == np.float32 and data.x.tolist() == [[1, 1]] * 3
    assert data.y.tolist() == [0, 1, 2] and data.source == "arrays"


def test_csv_label_column_anywhere_else_the_last_column(tmp_path):
    (tmp_path / "a.csv").write_text("a,label,b\n1.5,7,2\n3,5,-4\n")
    data = load_data(tmp_path / "a.csv")
    assert data.x.tolist() == [[1.5, 2.0], [3.0, -4.0]] and data.classes == ["5", "7"]
    assert data.y.tolist() == [1, 0]
    (tmp_path / "b.csv").write_text("a,b,target\n1,2,x\n3,4,y\n")
    data = load_data(tmp_path / "b.csv")
    assert data.x.tolist() == [[1, 2], [3, 4]] and data.classes == ["x", "y"]


@given(st.lists(st.integers(-(2**40), 2**40) | st.text(max_size=3), min_size=1, max_size=30))
@settings(max_examples=40, deadline=None)
def test_class_names_index_back_to_the_labels(labels):
    data = from_arrays(np.zeros((len(labels), 2)), np.array(labels, dtype=object))
    assert [data.classes[i] for i in data.y] == [str(v) for v in labels]
    if all(isinstance(v, int) for v in labels):
        assert data.classes == [str(v) for v in sorted(set(labels))]
    else:
        assert data.classes == sorted({str(v) for v in labels})


NAN_X, INF_X = X.copy(), X.copy()
NAN_X[2, 1] = NAN_X[5, 0] = np.nan
INF_X[3, 4] = np.inf
NAN_SEQ = np.repeat(X[:, None, :], 2, axis=1)  # (30, 2, 5): 2 channels of length 5
NAN_SEQ[4, 1, 3] = np.nan


@pytest.mark.parametrize(
    "name, x, y, fragment",
    [
        ("n.npz", NAN_X, Y, "row 2, column 1: feature value is NaN"),
        ("i.pt", INF_X, Y, "row 3, column 4: feature value is +Inf"),
        ("r1.npz", X[:, 0].copy(), Y, "features must be 2-D (rows, features) or more"),
        ("r1.pt", X[:, 0].copy(), Y, "found shape (30,)"),
        ("r3.pt", NAN_SEQ, Y, "row 4, position (1, 3): feature value is NaN"),
        ("m.safetensors", X, Y[:29], "30 feature rows but 29 labels"),
        ("z.npz", X[:0], Y[:0], "no rows"),
        ("f.npz", X[:3], np.array([1, 1.5, 2]), "row 1: label 1.5 is not a whole number"),
        ("l.pt", X[:3], np.array([1, 2, np.nan]), "row 2: label nan is not a whole number"),
    ],
)
def test_invalid_array_files_name_the_problem(tmp_path, name, x, y, fragment):
    expect_error(write(tmp_path / name, x, y), fragment)


def test_malformed_containers(tmp_path):
    np.savez(tmp_path / "k.npz", x=X, z=Y)
    expect_error(tmp_path / "k.npz", "no entry 'y' (found: x, z)")
    np.savez(tmp_path / "o.npz", x=X, y=Y.astype(object))
    expect_error(tmp_path / "o.npz", "'y' is an object array")  # read from its header alone
    torch.save([torch.zeros(2)], tmp_path / "s.pt")
    expect_error(tmp_path / "s.pt", "expected a dict with 'x' and 'y', found list")
    torch.save({"x": X, "y": Y}, tmp_path / "np.pt")  # numpy arrays, not tensors
    expect_error(tmp_path / "np.pt", "only tensors load: save {'x': tensor, 'y': tensor}")
    with open(tmp_path / "one.npz", "wb") as fh:
        np.save(fh, X)
    expect_error(tmp_path / "one.npz", "holds one array")
    df = pd.DataFrame({"f0": [1.0, 2.0], "color": ["red", "blue"], "label": [0, 1]})
    df.to_parquet(tmp_path / "c.parquet")
    expect_error(tmp_path / "c.parquet", f"column 'color' is not numeric: data row 0 {H} holds")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a,b,label\n1,2,0\n5,,0\n", f"data row 1 {H}, column 'b': feature value is NaN"),
        ("a,b,label\n1,inf,0\n", f"data row 0 {H}, column 'b': feature value is +Inf"),
        ("a,b,label\n1,2,0\n3,x,1\n", f"column 'b' is not numeric: data row 1 {H} holds 'x'"),
        ("a,label\n1,0\n2,2.5\n", f"data row 1 {H}: label 2.5 is not a whole number"),
        ("a,label\n1,0\n2,\n", f"data row 1 {H}: label is missing"),
        ("a,label\n1,0\n2,d\n", f"data row 1 {H}: label 'd' is not one of the 2 known classes"),
        ("a,b,label\n", "no rows"),
        ("label\n1\n2\n", "needs feature columns and a label column"),
    ],
)
def test_invalid_csv_names_the_data_row_and_column(tmp_path, text, fragment):
    (tmp_path / "t.csv").write_text(text)
    expect_error(tmp_path / "t.csv", fragment, classes=["0", "1"])


def test_unknown_label_against_given_classes(tmp_path):
    with pytest.raises(DataError) as excinfo:
        from_arrays(X[:3], ["a", "b", "z"], classes=["a", "b"], source="mine")
    assert (
        str(excinfo.value) == "mine: row 2: label 'z' is not one of the 2 known classes ['a', 'b']"
    )
    (tmp_path / "u.csv").write_text("f0,label\n1,c1\n2,nope\n3,zzz\n")
    text = expect_error(tmp_path / "u.csv", "", classes=[f"c{i}" for i in range(50)])
    assert f"data row 1 {H}: label 'nope'" in text and "(1 more rows too)" in text
    assert "'c9', ...]" in text and "c10" not in text
    for classes in (["a", "a"], [0, 1], "ab"):
        with pytest.raises(DataError, match="classes must"):
            from_arrays(X[:2], ["a", "a"], classes=classes)


def test_missing_unknown_empty_and_directory_paths(tmp_path):
    expect_error(str(tmp_path / "absent.npz"), "no such file")
    expect_error(
        tmp_path / "data.txt",
        "unknown data format '.txt': expected a file ending in .npz, .pt, .safetensors, .csv, "
        ".parquet, an x.npy with y.npy beside it or a built-in dataset (mnist1d, digits, "
        "synthetic, tokens, synthetic:DIM)",
    )
    expect_error("mnist", "unknown data format '(no extension)'")
    assert BUILTIN_DATASETS == ("mnist1d", "digits", "synthetic", "tokens")
    (tmp_path / "dir.csv").mkdir()
    expect_error(tmp_path / "dir.csv", "is not a file")
    for ext in EXTENSIONS:
        (tmp_path / f"empty{ext}").write_bytes(b"")
        expect_error(tmp_path / f"empty{ext}", "file is empty: no rows")


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_corrupt_file_is_a_data_error_naming_the_file(tmp_path, ext):
    path = tmp_path / f"bad{ext}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    expect_error(path, f"cannot read as a {ext} file: ")
    assert issubclass(DataError, StabqError) and issubclass(DataError, ValueError)


@pytest.mark.parametrize(
    "x, y, fragment",
    [
        (np.zeros((2, 2)), [[0], [1]], "labels must be 1-D (one per row), found shape (2, 1)"),
        (np.array([["a", "b"]]), [0], "features must be numbers, found dtype <U1"),
        (np.zeros((2, 0)), [0, 1], "no feature columns"),
        (np.array([[1.0], [1e39]]), [0, 1], "row 1, column 0: feature value 1e+39 overflows"),
        (np.array([[1.0], [-np.inf]]), [0, 1], "row 1, column 0: feature value is -Inf"),
        (np.zeros((2, 1)), [0, None], "row 1: label None is not a whole number or a string"),
        ([[1.0], [2.0, 3.0]], [0, 1], "x is not an array"),
    ],
)
def test_from_arrays_rejects(x, y, fragment):
    with pytest.raises(DataError) as excinfo:
        from_arrays(x, y)
    assert str(excinfo.value).startswith("arrays: ") and fragment in str(excinfo.value)


def labeled(counts: list[int]) -> LabeledData:
    y = np.repeat(np.arange(len(counts)), counts)
    x = np.stack([np.arange(len(y)), y], axis=1).astype(np.float32)  # column 0: row id
    names = [f"k{i}" for i in range(len(counts))]
    return from_arrays(x, [names[i] for i in y], classes=names)


def test_split_is_stratified_disjoint_covering_and_deterministic():
    data = labeled([60, 30, 10])
    train, val = train_val_split(data, val_fraction=0.2, seed=3)
    assert np.bincount(val.y).tolist() == [12, 6, 2] and np.bincount(train.y).tolist() == [
        48,
        24,
        8,
    ]
    assert sorted(np.concatenate([train.x[:, 0], val.x[:, 0]]).tolist()) == list(range(100))
    assert np.array_equal(train.x[:, 1], train.y) and np.array_equal(val.x[:, 1], val.y)
    assert train.classes == val.classes == ["k0", "k1", "k2"]
    assert np.array_equal(train_val_split(data, val_fraction=0.2, seed=3)[1].x, val.x)
    assert not np.array_equal(train_val_split(data, val_fraction=0.2, seed=4)[1].x, val.x)


@pytest.mark.parametrize(
    "counts, fraction, n_val",
    [([5, 5], 0.1, 1), ([50, 50], 0.07, 7), ([9, 1], 0.25, 3), ([3, 3], 0.9, 5)],
)
def test_split_sizes_with_at_least_one_validation_row(counts, fraction, n_val):
    train, val = train_val_split(labeled(counts), val_fraction=fraction)
    assert (len(train), len(val)) == (sum(counts) - n_val, n_val)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, "0.1"])
def test_split_rejects_bad_fraction_and_a_single_row(fraction):
    with pytest.raises(DataError, match="val_fraction"):
        train_val_split(labeled([5, 5]), val_fraction=fraction)
    with pytest.raises(DataError, match="need >= 2"):
        train_val_split(labeled([1]))


def test_standardizer_matches_hand_computation():
    x = np.array([[1, 2, 3], [3, 2, 5], [5, 2, 1]], dtype=np.float32)
    scaler = Standardizer.fit(x)
    s = np.sqrt(8 / 3)  # population std of (1, 3, 5) and of (3, 5, 1)
    assert scaler.mean.tolist() == [3, 2, 3] and scaler.mean.dtype == np.float32
    np.testing.assert_allclose(scaler.std, [s, 1, s], rtol=1e-7)  # constant column: std 1
    out = scaler.transform(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-2 / s, 0, 0], [0, 0, 2 / s], [2 / s, 0, -2 / s]], rtol=1e-6)


@given(st.integers(1, 20), st.integers(1, 6), st.integers(0, 2**32 - 1))
@example(n=2, d=4, seed=6785)  # two close values: a std of 3.5e-3 on values near 5
@settings(max_examples=30, deadline=None)
def test_standardized_columns_have_mean_0_and_std_1_or_0(n, d, seed):
    x = np.random.default_rng(seed).normal(5, 3, (n, d)).astype(np.float32)
    scaler = Standardizer.fit(x)
    out = scaler.transform(x)
    # mean and std are kept in float32: the mean's rounding, up to eps/2 of the values'
    # size, comes out divided by the std (a column of close values magnifies it)
    rounding = 4 * np.finfo(np.float32).eps * np.abs(x).max(0) / scaler.std + 1e-6
    assert np.all(np.abs(out.mean(0)) <= rounding)
    assert np.all((np.abs(out.std(0) - 1) < 1e-3 + rounding) | (out.std(0) < 1e-4))


def test_standardizer_json_round_trip_is_exact():
    scaler = Standardizer.fit(RNG.standard_normal((50, 7)).astype(np.float32) * 1e-20)
    back = Standardizer.from_dict(json.loads(json.dumps(scaler.to_dict())))
    assert np.array_equal(back.mean, scaler.mean) and np.array_equal(back.std, scaler.std)
    assert back.mean.dtype == back.std.dtype == np.float32


BAD_DICTS = [[1.0], {"mean": [0.0]}, {"mean": [0.0, 1.0], "std": [1.0]}, {"mean": [], "std": []}]
BAD_DICTS += [{"mean": [float("nan")], "std": [1.0]}, {"mean": [0.0], "std": [float("inf")]}]
BAD_DICTS += [{"mean": [0.0], "std": [v]} for v in (0.0, -1.0, "1", True)]
BAD_DICTS += [{"mean": 0.0, "std": 1.0}, {"mean": [0.0], "std": [1.0], "extra": 1}]


@pytest.mark.parametrize("d", BAD_DICTS)
def test_standardizer_from_dict_rejects(d):
    with pytest.raises(DataError, match=r"^Standardizer: "):
        Standardizer.from_dict(d)


def test_standardizer_refuses_wrong_width_and_bad_fit_input():
    scaler = Standardizer.fit(np.ones((2, 3)))
    assert scaler.std.tolist() == [1, 1, 1] and scaler.transform(np.ones((1, 3))).tolist() == [
        [0] * 3
    ]
    with pytest.raises(DataError, match=r"x of shape \(2, 4\) must end in 3 features"):
        scaler.transform(np.ones((2, 4)))
    for bad in (np.ones(3), np.ones((0, 3)), np.array([[np.nan, 1.0]])):
        with pytest.raises(DataError, match="fit needs finite x"):
            Standardizer.fit(bad)
