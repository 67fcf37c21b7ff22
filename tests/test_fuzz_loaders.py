"""Fuzzing the file loaders: whatever bytes a file holds, only a StabqError escapes.

``load_data`` on random bytes, CSV-like text, and mutated valid files
(truncations, flipped, inserted and deleted bytes) in every format, and
``stabq.load`` and ``load_history`` on model directories whose ``config.json``,
``model.safetensors`` or ``metrics.jsonl`` is mutated or replaced: each call
returns valid data (or a working model) or raises a one-line :class:`StabqError` naming the file;
never another exception, never a warning on the user's terminal, never a hang
(each example has a deadline, and a watchdog ends the run if a reader is stuck
in C code where no Python timeout reaches).
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import save_file

import stabq
from stabq.data import FILE_EXTENSIONS, from_arrays, load_data
from stabq.errors import StabqError
from stabq.model import BottleneckClassifier
from stabq.saving import load_history, save_model

EXAMPLES = int(os.environ.get("STABQ_FUZZ_EXAMPLES", "0"))  # 0: the suite's fixed, small set
FUZZ = settings(
    max_examples=EXAMPLES or 60,
    derandomize=not EXAMPLES,
    deadline=10_000,  # milliseconds; a file of a few kB loads in a few
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MAGIC = {".npz": b"PK\x03\x04", ".pt": b"PK\x03\x04", ".parquet": b"PAR1", ".csv": b"a,label\n"}
CSV_CHARS = ",;.\n\r\"' 0123456789-+eEnaNiIfFxlbt\t\x00"


@pytest.fixture(autouse=True)
def watchdog():
    """End the whole run, with every thread's traceback, if one test hangs for 5 minutes."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of one small valid file per format."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3)).astype(np.float32), np.arange(6) % 2
    tmp = tmp_path_factory.mktemp("valid")
    files = {}
    for ext in FILE_EXTENSIONS:
        path = tmp / f"v{ext}"
        if ext == ".npz":
            np.savez(path, x=x, y=y)
        elif ext == ".pt":
            torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
        elif ext == ".safetensors":
            save_file({"x": x, "y": y}, str(path))
        else:
            df = pd.DataFrame(x, columns=["a", "b", "c"]).assign(label=y)
            df.to_csv(path, index=False) if ext == ".csv" else df.to_parquet(path)
        files[ext] = path.read_bytes()
        assert len(load_data(path)) == 6  # the unmutated file loads
    return files


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """``data`` after 1 to 4 edits: truncate, flip a bit, set, insert, delete or repeat bytes."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "set", "insert", "delete", "repeat"]))
        at = draw(st.integers(0, len(b)))
        if op == "truncate":
            del b[at:]
        elif op == "flip" and at < len(b):
            b[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and at < len(b):
            b[at] = draw(st.integers(0, 255))
        elif op == "insert":
            b[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[at : at + draw(st.integers(1, 16))]
        elif op == "repeat":
            b[at:at] = b[at : at + draw(st.integers(1, 64))]
    return bytes(b)


def load_or_refuse(path: Path) -> None:
    """``load_data(path)`` gives valid data or a one-line DataError naming ``path``; no
    other exception and no warning escapes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = load_data(path)
        except StabqError as err:
            text = str(err)
            assert "\n" not in text and text.startswith(f"{path}: "), text
        else:
            assert data.x.ndim == 2 and data.x.dtype == np.float32 and np.isfinite(data.x).all()
            assert data.y.shape == (len(data.x),) and data.y.dtype == np.int64
            assert data.y.min() >= 0 and data.y.max() < data.num_classes
    assert not [w for w in caught if not issubclass(w.category, ResourceWarning)], [
        str(w.message) for w in caught
    ]


@pytest.mark.parametrize("ext", FILE_EXTENSIONS)
@given(data=st.data())
@FUZZ
def test_mutated_valid_files_load_or_raise_a_stabq_error(ext, data, valid_files, tmp_path):
    path = tmp_path / f"mutated{ext}"
    path.write_bytes(data.draw(mutations(valid_files[ext]), label="bytes"))
    load_or_refuse(path)


@pytest.mark.parametrize("ext", FILE_EXTENSIONS)
@given(body=st.binary(max_size=1024), magic=st.booleans())
@FUZZ
def test_random_bytes_load_or_raise_a_stabq_error(ext, body, magic, tmp_path):
    path = tmp_path / f"random{ext}"
    path.write_bytes((MAGIC.get(ext, len(body).to_bytes(8, "little")) if magic else b"") + body)
    load_or_refuse(path)


@given(text=st.text(alphabet=CSV_CHARS, max_size=300), header=st.booleans())
@FUZZ
def test_csv_like_text_loads_or_raises_a_stabq_error(text, header, tmp_path):
    path = tmp_path / "text.csv"
    path.write_text(("a,b,label\n" if header else "") + text, encoding="utf-8")
    load_or_refuse(path)


ANY_DTYPE = st.one_of(
    hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
    hnp.boolean_dtypes(), hnp.complex_number_dtypes(), hnp.datetime64_dtypes(),
    hnp.unicode_string_dtypes(max_len=3), hnp.byte_string_dtypes(max_len=3),
)  # fmt: skip
ANY_ARRAY = hnp.arrays(ANY_DTYPE, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))


@given(x=ANY_ARRAY, y=ANY_ARRAY, fmt=st.sampled_from(["arrays", ".npz", ".safetensors", ".pt"]))
@FUZZ
def test_arrays_of_any_dtype_and_shape_load_or_raise_a_stabq_error(x, y, fmt, tmp_path):
    """Well-formed files holding arrays of any rank, size and dtype (strings, dates,
    complex, bytes...): the validation, not the parser, must answer."""
    path = tmp_path / f"arrays{fmt}"
    try:  # each format stores what it can; the rest is not a file a user can make
        if fmt == ".npz":
            np.savez(path, x=x, y=y)
        elif fmt == ".safetensors":
            save_file({"x": np.ascontiguousarray(x), "y": np.ascontiguousarray(y)}, str(path))
        elif fmt == ".pt":
            tensors = {
                k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in (("x", x), ("y", y))
            }
            torch.save(tensors, path)
    except Exception:  # safetensors' own error type among them
        assume(False)
    if fmt != "arrays":
        load_or_refuse(path)
        return
    try:
        data = from_arrays(x, y)
    except StabqError as err:
        assert "\n" not in str(err) and str(err).startswith("arrays: "), str(err)
    else:
        assert data.x.dtype == np.float32 and np.isfinite(data.x).all() and len(data) >= 1


# --- model directories ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = BottleneckClassifier(3, 2, "fsq", hidden=4, bottleneck_dim=4, levels=[3, 3])
    history = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25}]
    directory = tmp_path_factory.mktemp("model") / "m"
    return save_model(model, directory, classes=["a", "b"], history=history)


def load_model_or_refuse(directory: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = stabq.load(directory)
        except StabqError as err:
            assert "\n" not in str(err) and str(err).startswith(str(directory)), str(err)
        else:  # a harmless edit (whitespace, a field outside the checksums) loads and works
            with torch.no_grad():
                logits = model(torch.randn(5, model.input_dim))[0]
            assert torch.isfinite(logits).all() and model.classes == ["a", "b"]
        try:
            history = load_history(directory)
        except StabqError as err:
            assert "\n" not in str(err) and str(err).startswith(str(directory)), str(err)
        else:
            assert all(isinstance(row, dict) for row in history)
    assert not [w for w in caught if not issubclass(w.category, ResourceWarning)], [
        str(w.message) for w in caught
    ]


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "metrics.jsonl"])
@given(data=st.data(), replace=st.booleans())
@FUZZ
def test_mutated_model_files_load_or_raise_a_stabq_error(
    name, data, replace, saved_model, tmp_path
):
    directory = tmp_path / "m"
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(saved_model, directory)
    good = (saved_model / name).read_bytes()
    new = data.draw(st.binary(max_size=1024) if replace else mutations(good), label="bytes")
    (directory / name).write_bytes(new)
    load_model_or_refuse(directory)
