"""The bad-data battery: every bad data file through the CLI and through Python alike.

Each case builds one bad input; the same table runs through ``stabq train``,
``evaluate``, ``encode`` and ``compare`` (one line naming the file and the
problem, exit status 2, nothing written or clobbered) and through
``load_data`` (the same :class:`DataError`, one line starting with the file).
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stabq
from bad_input import Payload, assert_user_error, cli, listing, run_stabq, write
from stabq.data import load_data, require_classes
from stabq.errors import DataError, ShapeError, StabqError
from stabq.estimator import DiscreteBottleneckClassifier
from stabq.model import BottleneckClassifier
from stabq.saving import save_model

FEATURES, CLASSES = 4, ["0", "1", "2"]
RNG = np.random.default_rng(3)
X = RNG.standard_normal((12, FEATURES)).astype(np.float32)
Y = np.arange(12) % 3
H = "(0-based, header excluded)"
COMMANDS = ("train", "evaluate", "encode", "compare")


def truncated(ext: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = write(tmp / f"cut{ext}", X, Y)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path

    return build


def corrupted(ext: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = write(tmp / f"bad{ext}", X, Y)
        data = bytearray(path.read_bytes())
        data[:8] = b"\xff\xfe\x00\x80garb"  # broken magic / header length / not UTF-8
        path.write_bytes(bytes(data))
        return path

    return build


def pickled(how: str) -> Callable[[Path], Path]:
    """A .pt that unpickles into a :class:`Payload`: torch.save'd, legacy format, raw pickle."""

    def build(tmp: Path) -> Path:
        path, obj = tmp / f"{how}.pt", {"x": torch.from_numpy(X), "y": Payload(tmp / "MARKER")}
        if how == "raw":
            path.write_bytes(pickle.dumps(obj))
        else:
            torch.save(obj, path, _use_new_zipfile_serialization=how == "zip")
        return path

    return build


def arrays(name: str, x, y) -> Callable[[Path], Path]:
    return lambda tmp: write(tmp / name, np.asarray(x), np.asarray(y))


def text(name: str, body: str | bytes) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        return path

    return build


def nan_at(row: int, col: int, value: float) -> np.ndarray:
    x = X.copy()
    x[row, col] = value
    return x


def sparse_pt(tmp: Path) -> Path:
    torch.save({"x": torch.eye(12, 4).to_sparse(), "y": torch.from_numpy(Y)}, tmp / "sp.pt")
    return tmp / "sp.pt"


def dates_parquet(tmp: Path) -> Path:
    dates = pd.to_datetime(["2020-01-01"] * 3 + ["2021-01-01"] * 3)
    pd.DataFrame({"f0": X[:6, 0], "day": dates, "label": Y[:6]}).to_parquet(tmp / "d.parquet")
    return tmp / "d.parquet"


def directory(tmp: Path) -> Path:
    (tmp / "dir.npz").mkdir()
    return tmp / "dir.npz"


@dataclass
class Case:
    id: str
    build: Callable[[Path], Path]
    fragments: tuple[str, ...]
    commands: tuple[str, ...] = COMMANDS


NAN = "feature value is NaN"
TRUNCATED = [Case(f"truncated{e}", truncated(e), (f"cannot read as a {e} file",)) for e in
             (".npz", ".pt", ".safetensors", ".parquet")]  # fmt: skip
CORRUPTED = [Case(f"corrupted{e}", corrupted(e), (f"cannot read as a {e} file",)) for e in
             (".npz", ".pt", ".safetensors", ".parquet", ".csv")]  # fmt: skip
PICKLED = [Case(f"pickle-{how}", pickled(how), ("cannot read as a .pt file", "only tensors"))
           for how in ("zip", "legacy", "raw")]  # fmt: skip
CASES = [
    Case("missing", lambda tmp: tmp / "absent.npz", ("no such file",)),
    Case("directory", directory, ("is not a file",)),
    Case("unknown-extension", text("data.txt", "1,2\n"), ("unknown data format '.txt'",)),
    Case("no-extension", text("data", "1,2\n"), ("unknown data format '(no extension)'",)),
    Case("empty", text("empty.parquet", b""), ("file is empty",)),
    *TRUNCATED,
    Case("truncated.csv", truncated(".csv"), (f"data row 5 {H}", "label is missing")),
    *CORRUPTED,
    *PICKLED,
    Case("rank-1", arrays("r1.npz", X[:, 0], Y), ("features must be 2-D", "found shape (12,)")),
    Case("labels-2d", arrays("l2.npz", X, Y[:, None]), ("labels must be 1-D",)),
    Case("zero-rows", arrays("z.safetensors", X[:0], Y[:0]), ("no rows",)),
    Case("header-only", text("h.csv", "a,b,label\n"), ("no rows",)),
    Case(
        "single-class",
        arrays("one.npz", X, Y * 0),
        ("1 class ('0') in 12 rows",),
        ("train", "compare"),
    ),
    Case("nan", arrays("n.npz", nan_at(4, 2, np.nan), Y), (f"row 4, column 2: {NAN}",)),
    Case(
        "inf", arrays("i.pt", nan_at(7, 0, -np.inf), Y), ("row 7, column 0: feature value is -Inf",)
    ),
    Case(
        "nan-csv",
        text("n.csv", "a,b,label\n1,2,0\n3,,1\n"),
        (f"data row 1 {H}, column 'b': {NAN}",),
    ),
    Case(
        "text-feature",
        text("t.csv", "a,b,label\n1,2,0\n3,x,1\n"),
        (f"column 'b' is not numeric: data row 1 {H} holds 'x'",),
    ),
    Case("sparse-tensor", sparse_pt, ("cannot read as a .pt file: TypeError", "Sparse")),
    Case("date-feature", dates_parquet, ("column 'day' is not numeric",)),
    Case("string-features", arrays("s.npz", X.astype(str), Y), ("features must be numbers",)),
    Case(  # what df["label"].to_numpy() gives for text labels: np.load would need pickle
        "object-labels",
        arrays("o.npz", X, np.array(["a", "b", "c"] * 4, dtype=object)),
        ("'y' is an object array", "would need pickle", "save it as y.astype(str)"),
    ),
    Case(
        "object-features",
        arrays("of.npz", X.astype(object), Y),
        ("'x' is an object array", "save it as x.astype(np.float32)"),
    ),
    Case(
        "fractional-label",
        arrays("f.npz", X[:3], [0, 1.5, 2]),
        ("row 1: label 1.5 is not a whole number",),
    ),
    Case(
        "nan-label", text("nl.csv", "a,label\n1,0\n2,nan\n"), (f"data row 1 {H}: label is missing",)
    ),
    Case(
        "unknown-label",
        arrays("u.npz", X[:4], [0, 1, 7, 2]),
        ("row 2: label '7' is not one of the 3 known classes",),
        ("evaluate",),
    ),
]


def npy_pair(name: str, x, y, y_name: str = "y.npy") -> Callable[[Path], Path]:
    """A directory ``name`` holding ``x.npy`` and (``y`` not None) ``y_name``."""

    def build(tmp: Path) -> Path:
        (tmp / name).mkdir()
        np.save(tmp / name / "x.npy", np.asarray(x), allow_pickle=True)
        if y is not None:
            np.save(tmp / name / y_name, np.asarray(y), allow_pickle=True)
        return tmp / name

    return build


def npy_file(tmp: Path) -> Path:
    np.save(tmp / "feats.npy", X)
    return tmp / "feats.npy"


NPY_CASES = [
    Case("npy-no-labels", npy_pair("nolabels", X, None), ("no labels file", "y.npy")),
    Case("npy-no-x", npy_pair("nox", X, Y, "x_and.npy"), ("no labels file",)),
    Case("npy-unnamed", npy_file, ("cannot tell where the labels are",)),
    Case("npy-lengths", npy_pair("len", X, Y[:-1]), ("12 feature rows but 11 labels",)),
    Case(
        "npy-object-x",
        npy_pair("ox", X.astype(object), Y),
        ("x.npy is an object array", "never runs", "x.astype(np.float32)"),
    ),
    Case(
        "npy-object-y",
        npy_pair("oy", X, np.array(["a", "b", "c"] * 4, dtype=object)),
        ("y.npy is an object array", "y.astype(str)"),
    ),
    Case("npy-strings", npy_pair("s", X.astype(str), Y), ("features must be numbers",)),
    Case("npy-complex", npy_pair("c", X.astype(complex), Y), ("features must be numbers",)),
    Case("npy-rank-1", npy_pair("r1", X[:, 0], Y), ("features must be 2-D",)),
    Case("npy-nan", npy_pair("nan", nan_at(4, 2, np.nan), Y), (f"row 4, column 2: {NAN}",)),
]
CASES += NPY_CASES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained 4-feature, 3-class model: enough to refuse data with."""
    torch.manual_seed(0)
    model = BottleneckClassifier(FEATURES, 3, "fsq", hidden=8, bottleneck_dim=4, levels=[3, 3])
    return save_model(model, tmp_path_factory.mktemp("model") / "m", classes=CLASSES)


def run_command(command: str, data: Path | str, model_dir: Path, work: Path):
    """Run ``command`` on ``data``; return the result and the check of what it left."""
    if command == "train":
        out = work / "run"
        result = cli("train", "--data", data, "--out", out, "--epochs", "1", "--quiet")
        return result, lambda: not out.exists()
    if command == "evaluate":
        return cli("evaluate", model_dir, "--data", data), lambda: True
    if command == "compare":
        out = work / "report"
        result = cli("compare", "--data", data, "--methods", "fsq", "--seeds", "1", "--out", out)
        return result, lambda: not out.exists()
    out = work / "codes.npy"
    np.save(out, np.arange(3))
    before = listing(work)
    result = cli("encode", model_dir, "--data", data, "--out", out)
    return result, lambda: listing(work) == before


@pytest.mark.parametrize(
    "case, command",
    [pytest.param(c, m, id=f"{c.id}-{m}") for c in CASES for m in c.commands],
)
def test_cli_refuses_bad_data_in_one_line_and_writes_nothing(case, command, model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    data = case.build(tmp_path / "in")
    work = tmp_path / "work"
    work.mkdir()
    result, left_as_it_was = run_command(command, data, model_dir, work)
    assert_user_error(result, f"stabq: error: {data}: ", *case.fragments)
    assert left_as_it_was(), sorted(p.name for p in work.iterdir())
    assert not (tmp_path / "in" / "MARKER").exists()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_python_refuses_bad_data_with_the_same_data_error(case, tmp_path):
    data = case.build(tmp_path)
    classes = CLASSES if case.commands == ("evaluate",) else None
    with pytest.raises(DataError) as info:
        require_classes(load_data(data, classes=classes))
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{data}: "), text
    assert all(f in text for f in case.fragments), (case.fragments, text)
    assert isinstance(info.value, StabqError) and isinstance(info.value, ValueError)
    assert not (tmp_path / "MARKER").exists()


def test_bad_data_leaves_an_earlier_model_at_out_as_it_was(model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(model_dir, out)
    data = arrays("n.npz", nan_at(4, 2, np.nan), Y)(tmp_path)
    before = listing(tmp_path)
    result = cli("train", "--data", data, "--out", out, "--epochs", "1", "--quiet")
    assert_user_error(result, str(data), "row 4, column 2")
    assert listing(tmp_path) == before


def test_an_empty_data_name_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"^data: no name given: a file or a built-in \(mnist1d"):
        load_data(" ")
    result = cli("train", "--data", "", "--out", tmp_path / "run")
    assert_user_error(result, "stabq: error: data: no name given")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["zip", "legacy", "raw"])
def test_the_pickle_payload_would_run_if_unpickled(how, tmp_path):
    # The proof that the marker tests can fail: plain unpickling does create the marker.
    path = pickled(how)(tmp_path)
    if how == "raw":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert (tmp_path / "MARKER").exists()


def test_single_class_is_refused_by_the_python_api_naming_the_source():
    model = BottleneckClassifier(FEATURES, 2, "fsq", hidden=8, bottleneck_dim=4, levels=[3, 3])
    with pytest.raises(DataError, match=r"^arrays: 1 class \('5'\) in 12 rows"):
        stabq.train(model, (X, np.full(12, 5)))
    with pytest.raises(DataError, match=r"^y: 1 class \('5'\) in 12 rows"):
        DiscreteBottleneckClassifier(epochs=1).fit(X, np.full(12, 5))


def small_model(num_classes: int = 3) -> BottleneckClassifier:
    torch.manual_seed(0)
    return BottleneckClassifier(
        FEATURES, num_classes, "fsq", hidden=8, bottleneck_dim=4, levels=[3, 3]
    )


@pytest.mark.parametrize(
    "val_y, fragment",
    [
        (np.arange(12) % 5, "arrays: row 3: label '3' is not one of the 3 known classes"),
        (np.full(12, "b"), "arrays: row 0: label 'b' is not one of the 3 known classes"),
    ],
)
def test_python_train_refuses_validation_labels_the_training_data_lacks(val_y, fragment):
    # Validation labels beyond the training classes raised IndexError inside cross_entropy.
    config = stabq.TrainConfig(epochs=1, progress=False)
    with pytest.raises(DataError) as info:
        stabq.train(small_model(), (X, Y), val=(X, val_y), config=config)
    assert str(info.value).startswith(fragment), str(info.value)


def test_python_train_numbers_validation_classes_as_the_training_data_does():
    # Validation labels {1, 2} used to become ids {0, 1}: class 1 was scored as class 0.
    config = stabq.TrainConfig(epochs=1, progress=False)
    model = small_model()
    val_x, val_y = X[Y > 0], Y[Y > 0]
    result = stabq.train(model, (X, Y), val=(val_x, val_y), config=config)
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(val_x))[0].argmax(-1).numpy()
    assert result.final["val_accuracy"] == pytest.approx(float((predicted == val_y).mean()))


def test_python_train_names_the_label_the_model_has_no_class_for():
    with pytest.raises(
        DataError, match=r"^arrays \(train split\): label '2' is class 2 of \['0', '1', '2'\], but"
    ):
        stabq.train(small_model(2), (X, Y), config=stabq.TrainConfig(epochs=1, progress=False))


@pytest.mark.parametrize("command", ["evaluate", "encode"])
def test_feature_count_that_differs_from_the_model(command, model_dir, tmp_path):
    data = write(tmp_path / "wide.npz", RNG.standard_normal((6, 7)).astype(np.float32), Y[:6])
    result, left_as_it_was = run_command(command, data, model_dir, tmp_path)
    assert_user_error(result, str(data), "7 features", f"model in {model_dir} expects 4")
    assert left_as_it_was()
    model = stabq.load(model_dir)
    with pytest.raises(ShapeError, match=r"input of shape \(6, 7\): the model expects 4"):
        model(torch.from_numpy(load_data(data).x))


def test_train_validation_data_with_unknown_labels_names_it(tmp_path):
    train_file = write(tmp_path / "t.npz", X, Y)
    val_file = write(tmp_path / "v.npz", X[:4], np.array([0, 1, 2, 9]))
    out = tmp_path / "run"
    result = cli("train", "--data", train_file, "--val-data", val_file, "--out", out, "--quiet")
    assert_user_error(result, str(val_file), "row 3: label '9' is not one of the 3 known")
    assert not out.exists()


# --- the estimator: the same DataError, a ValueError as scikit-learn expects -------------------

FIT_CASES = [
    ("nan", nan_at(4, 2, np.nan), Y, ["X: row 4, column 2: feature value is NaN"]),
    ("inf", nan_at(1, 3, np.inf), Y, ["X: row 1, column 3: feature value is +Inf"]),
    (
        "overflow",
        X.astype(np.float64) * 1e300,
        Y,
        ["X: row 0, column 0: feature value", "overflows float32"],
    ),
    ("rank-1", X[:, 0], Y, ["Expected 2D array"]),
    ("zero-rows", X[:0], Y[:0], ["0 sample(s)"]),
    ("text", np.full((12, 4), "a", dtype=object), Y, ["could not convert string to float"]),
    ("fractional-labels", X, Y + 0.5, ["Unknown label type"]),
    ("nan-label", X, np.where(Y == 1, np.nan, Y), ["Input y contains NaN"]),
    ("single-class", X, Y * 0, ["y: 1 class ('0') in 12 rows"]),
]


@pytest.mark.parametrize(
    "x, y, fragments", [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES]
)
def test_estimator_fit_raises_data_errors(x, y, fragments):
    with pytest.raises(DataError) as info:
        DiscreteBottleneckClassifier(epochs=1, hidden=8, bottleneck_dim=4).fit(x, y)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_estimator_predict_raises_data_errors():
    est = DiscreteBottleneckClassifier(
        epochs=1, hidden=8, bottleneck_dim=4, quantizer_options={"levels": [3, 3]}
    ).fit(X, Y)
    for x, fragment in [
        (X[:, :3], "X has 3 features, but DiscreteBottleneckClassifier is expecting 4"),
        (nan_at(5, 1, np.nan), "X: row 5, column 1: feature value is NaN"),
        (X[:0], "0 sample(s)"),
    ]:
        for method in (est.predict, est.predict_proba, est.transform):
            with pytest.raises(DataError) as info:
                method(x)
            assert fragment in str(info.value), (method.__name__, str(info.value))


ANY_ARRAY = hnp.arrays(
    st.one_of(
        hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
        hnp.boolean_dtypes(), hnp.complex_number_dtypes(), hnp.datetime64_dtypes(),
        hnp.timedelta64_dtypes(), hnp.unicode_string_dtypes(max_len=3),
    ),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)  # fmt: skip


@given(x=ANY_ARRAY, y=ANY_ARRAY, method=st.sampled_from(["fit", "predict", "transform"]))
@settings(max_examples=40, derandomize=True, deadline=10_000)
def test_estimator_takes_any_array_or_raises_a_data_error(x, y, method):
    est = DiscreteBottleneckClassifier(
        epochs=1, hidden=4, bottleneck_dim=2, quantizer_options={"levels": [3, 3]}
    )
    try:
        if method == "fit":
            est.fit(x, y)
        else:
            getattr(est.fit(X, Y), method)(x)
    except StabqError as err:
        assert isinstance(err, ValueError) and "\n" not in str(err), str(err)


# --- real processes: exit status 2, one stderr line, no traceback; --debug shows it ------------


def test_process_refuses_a_pickled_pt_in_one_line_without_running_it(tmp_path):
    data = pickled("zip")(tmp_path)
    proc = run_stabq("train", "--data", data, "--out", tmp_path / "run", "--quiet")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stabq: error: {data}: cannot read"), lines
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "run").exists()


def test_debug_shows_the_traceback_of_a_data_error(tmp_path):
    # In a real process this is Python's traceback (tests/test_cli.py runs one).
    data = arrays("n.npz", nan_at(4, 2, np.nan), Y)(tmp_path)
    result = cli("train", "--data", data, "--out", tmp_path / "run", "--debug")
    assert result.exit_code == 1 and isinstance(result.exception, DataError)
    assert str(result.exception).startswith(f"{data}: row 4, column 2: feature value is NaN")
    assert result.exc_info[2] is not None and "stabq: error" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_rows_of_another_shape_than_the_encoder_takes_are_one_line(model_dir, tmp_path):
    """Sequences (N, 4, 1) load (any rank does), but the MLP encoder and the saved 4-feature
    model take (N, 4): each command names the expected and the found shape."""
    (tmp_path / "in").mkdir()
    data = write(tmp_path / "in" / "r3.pt", X[:, :, None], Y)
    assert load_data(data).input_shape == (4, 1)
    expected = {
        "train": ("inputs of shape (N, 4, 1): encoder 'mlp' takes (N, D)", "--encoder cnn1d"),
        "compare": ("inputs of shape (N, 4, 1): encoder 'mlp' takes (N, D)",),
        "evaluate": (f"inputs of shape (N, 4, 1), the model in {model_dir} expects (N, 4)",),
        "encode": (f"inputs of shape (N, 4, 1), the model in {model_dir} expects (N, 4)",),
    }
    for command, fragments in expected.items():
        work = tmp_path / command
        work.mkdir()
        result, left_as_it_was = run_command(command, data, model_dir, work)
        assert_user_error(result, f"stabq: error: {data}", *fragments)
        assert left_as_it_was(), sorted(p.name for p in work.iterdir())
    with pytest.raises(ShapeError, match=r"takes \(N, D\): choose --encoder cnn1d or cnn2d"):
        BottleneckClassifier((4, 1), 3, "fsq", levels=[3, 3])


def test_npy_rows_of_a_rank_the_encoder_cannot_take_are_refused(tmp_path):
    data = npy_pair("r5", np.zeros((12, 1, 1, 2, 2), np.float32), Y)(tmp_path)
    result = cli("train", "--data", data, "--out", tmp_path / "run", "--epochs", "1")
    assert_user_error(result, f"{data}: inputs of shape (N, 1, 1, 2, 2): encoder 'mlp' takes")
    assert not (tmp_path / "run").exists()
