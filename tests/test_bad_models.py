"""The bad-model and bad-option battery, through the CLI and through Python alike.

Damaged model directories (``stabq.load``, ``stabq evaluate``, ``stabq encode``)
and invalid options (``stabq train`` and the Python call it makes): one line
naming the file or option, exit status 2, nothing written or clobbered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import stabq
from bad_input import (
    Payload,
    assert_user_error,
    cli,
    config_of,
    listing,
    mounted_tmpfs,
    read_only,
    recorded,
    run_stabq,
)
from stabq.cli import main, parse_options
from stabq.errors import CheckpointError, ConfigError, ModelFileError
from stabq.model import BottleneckClassifier
from stabq.quantizers.registry import build_quantizer
from stabq.saving import FORMAT_VERSION, load_history, save_model
from stabq.training import TrainConfig
from stabq.training.loop import resolve_device

CLASSES = ["0", "1", "2"]
DATA = "synthetic:4"  # 4 features, classes 0..9: the evaluate runs fail on the model, not here


def set_config(**changes) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        config = config_of(d)
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))

    return damage


def write(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        path = d / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)

    return damage


def remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def flip(at: int) -> Callable[[bytes], bytes]:
    return lambda b: b[:at] + bytes([b[at] ^ 0x01]) + b[at + 1 :]


def pickle_for_weights(d: Path) -> None:
    weights = d / "model.safetensors"
    weights.write_bytes(pickle.dumps({"w": Payload(d.parent / "MARKER")}))
    set_config(weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())(d)


def replace_with_file(d: Path) -> None:
    shutil.rmtree(d)
    d.write_text("not a model")


MODEL_CASES = {  # what is damaged -> (damage, the file named, fragments)
    "no-directory": (shutil.rmtree, "", "no such model directory"),
    "a-file": (replace_with_file, "", "is not a directory"),
    "config-missing": (remove("config.json"), "", "config.json is missing"),
    "config-not-json": (write("config.json", b"{ not json"), "config.json", "unreadable"),
    "config-not-utf8": (write("config.json", b"\xff\xfe{}"), "config.json", "unreadable"),
    "config-deep": (write("config.json", b"[" * 10**5), "config.json", "nested too deeply"),
    "config-a-list": (write("config.json", b"[1, 2]"), "config.json", "not a stabq model config"),
    "config-altered": (set_config(classes=["0", "1", "9"]), "config.json", "altered"),
    "config-newer": (
        set_config(format_version=FORMAT_VERSION + 1, stabq_version="9.1"),
        "config.json",
        f"written by stabq 9.1 (model format {FORMAT_VERSION + 1})",
    ),
    "config-version-text": (set_config(format_version="1"), "config.json", "format_version='1'"),
    "crafted-classes": (recorded(classes=["a"]), "config.json", "1 class names for 3 classes"),
    "crafted-kwargs": (recorded(quantizer_kwargs={"hidden": 3}), "", "cannot rebuild the model"),
    "crafted-hidden": (
        recorded(hidden=16),
        "config.json",
        "hidden=16, but model.safetensors was saved with hidden=8 (its projector.0.weight has "
        "shape [8, 4], not [16, 4])",
    ),
    "crafted-levels": (recorded(quantizer_kwargs={"levels": "ab"}), "", "levels='ab'"),
    "crafted-huge-int": (recorded(hidden=10**30), "config.json", f"hidden={10**30}, allowed"),
    "crafted-huge-rows": (
        recorded(input_shape=[2**16, 2**16]),
        "config.json",
        "input_shape=[65536, 65536], allowed is at most 2147483648 values in one row",
    ),
    "untrusted-encoder": (
        recorded(encoder="stabq_test_elsewhere:make"),
        "",
        "its encoder is stabq_test_elsewhere:make, a factory from outside stabq that loading it "
        "would import and run",
    ),
    "weights-missing": (remove("model.safetensors"), "", "model.safetensors is missing"),
    "weights-flipped": (write("model.safetensors", flip(-1)), "model.safetensors", "altered"),
    "weights-header": (write("model.safetensors", flip(20)), "model.safetensors", "corrupted"),
    "weights-cut": (write("model.safetensors", lambda b: b[:100]), "model.safetensors", "altered"),
    "weights-a-pickle": (pickle_for_weights, "", "cannot rebuild the model"),
}


SAVED = "but model.safetensors was saved with quantizer_kwargs.codebook_size=16"
VQ_CASES = {  # on a VQ model of 16 codes: sizes only the weights' header can confirm
    "crafted-codebook-huge": (
        recorded(quantizer_kwargs={"codebook_size": 10**12}),
        "config.json",
        f"quantizer_kwargs.codebook_size=1000000000000, {SAVED} (its quantizer.codebook.embed "
        f"has shape [1, 16, 4], not [1, 1000000000000, 4])",
    ),
    "crafted-codebook-fits": (  # fits in memory: refused all the same, never allocated
        recorded(quantizer_kwargs={"codebook_size": 4096}),
        "config.json",
        f"quantizer_kwargs.codebook_size=4096, {SAVED}",
    ),
    "crafted-quantizer": (
        recorded(quantizer="rvq", quantizer_kwargs={"codebook_size": 16}),
        "config.json",
        "the model it describes does not fit model.safetensors (missing: quantizer.layers.0",
    ),
    "crafted-layers": (
        recorded(quantizer="rvq", quantizer_kwargs={"num_quantizers": 10**6}),
        "config.json",
        "quantizer_kwargs.num_quantizers=1000000, allowed is at most 1024",
    ),
}


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = BottleneckClassifier(4, 3, "fsq", hidden=8, bottleneck_dim=4, levels=[3, 3])
    return save_model(model, tmp_path_factory.mktemp("good") / "m", classes=CLASSES)


@pytest.fixture(scope="module")
def good_vq_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = BottleneckClassifier(4, 3, "vq", hidden=8, bottleneck_dim=4, codebook_size=16)
    return save_model(model, tmp_path_factory.mktemp("good-vq") / "m", classes=CLASSES)


@pytest.fixture(params=[*MODEL_CASES, *VQ_CASES], ids=[*MODEL_CASES, *VQ_CASES])
def damaged(request, good_model, good_vq_model, tmp_path) -> tuple[Path, str, str]:
    vq = request.param in VQ_CASES
    damage, named, fragment = (VQ_CASES if vq else MODEL_CASES)[request.param]
    d = tmp_path / "models" / "m"
    shutil.copytree(good_vq_model if vq else good_model, d)
    damage(d)
    return d, str(d / named) if named else str(d), fragment


def test_python_load_refuses_a_damaged_model(damaged):
    d, named, fragment = damaged
    with pytest.raises(ModelFileError) as info:
        stabq.load(d)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{named}: ") and fragment in text, text
    assert not (d.parent / "MARKER").exists()


@pytest.mark.parametrize("command", ["evaluate", "encode"])
def test_cli_refuses_a_damaged_model_and_writes_nothing(damaged, command, tmp_path):
    d, named, fragment = damaged
    work = tmp_path / "work"
    work.mkdir()
    out = work / "codes.npy"
    np.save(out, np.arange(3))
    before = listing(work)
    extra = ["--out", out] if command == "encode" else []
    result = cli(command, d, "--data", DATA, *extra)
    assert_user_error(result, f"stabq: error: {named}: ", fragment)
    assert listing(work) == before
    assert not (d.parent / "MARKER").exists()


def test_the_crafted_configs_pass_the_checksums(good_model, tmp_path):
    # The "crafted" cases above reach the content checks only if their checksums hold:
    # a harmless crafted change (the same classes, renamed) must load.
    d = tmp_path / "m"
    shutil.copytree(good_model, d)
    recorded(classes=["x", "y", "z"])(d)
    assert stabq.load(d).classes == ["x", "y", "z"]


# --- invalid options: stabq train and the Python call behind it ------------------------------

Q = "--quantizer"
OPTION_CASES = [  # (CLI arguments, the same in Python, fragments of both messages)
    ([Q, "nope"], lambda: build_quantizer("nope", 8), ["quantizer='nope' is not a preset"]),
    (["--option", "levels=abc"], lambda: build_quantizer("fsq", 8, levels="abc"),
     ["FSQ: levels='abc'", "integers >= 2"]),
    (["--option", "levels=[1,5]"], lambda: build_quantizer("fsq", 8, levels=[1, 5]),
     ["levels=[1, 5]"]),
    (["--option", "levels=[2.5]"], lambda: build_quantizer("fsq", 8, levels=[2.5]),
     ["levels=[2.5]"]),
    (["--option", "bogus=1"], lambda: build_quantizer("fsq", 8, bogus=1),
     ["no option 'bogus'", "allowed: levels"]),
    (["--option", "levels"], lambda: parse_options(["levels"]), ["'levels'", "KEY=VALUE"]),
    ([Q, "vq", "--option", "codebook_size=-5"],
     lambda: build_quantizer("vq", 8, codebook_size=-5), ["codebook_size=-5", ">= 1"]),
    ([Q, "vq", "--option", "cosine=abc"], lambda: build_quantizer("vq", 8, cosine="abc"),
     ["cosine='abc', allowed is true or false"]),
    ([Q, "vq", "--option", "decay=2"], lambda: build_quantizer("vq", 8, decay=2), ["decay=2"]),
    ([Q, "rvq", "--option", "num_quantizers=0"],
     lambda: build_quantizer("rvq", 8, num_quantizers=0), ["num_quantizers=0"]),
    ([Q, "pq", "--option", "num_subspaces=3"],
     lambda: build_quantizer("pq", 128, num_subspaces=3), ["num_subspaces=3 with dim=128"]),
    ([Q, "gumbel", "--option", "tau_start=-1"],
     lambda: build_quantizer("gumbel", 8, tau_start=-1), ["tau_start=-1"]),
    ([Q, "vq", "--option", "commitment_weight=Infinity"],
     lambda: build_quantizer("vq", 8, commitment_weight=float("inf")),
     ["commitment_weight=inf, allowed is a finite number >= 0"]),
    (["--epochs", "-1"], lambda: TrainConfig(epochs=-1), ["epochs=-1"]),
    (["--batch-size", "0"], lambda: TrainConfig(batch_size=0), ["batch_size=0"]),
    (["--lr", "nan"], lambda: TrainConfig(lr=float("nan")), ["lr=nan"]),
    (["--hidden", "0"], lambda: BottleneckClassifier(4, 3, hidden=0), ["hidden=0"]),
    (["--bottleneck-dim", "-2"], lambda: BottleneckClassifier(4, 3, bottleneck_dim=-2),
     ["bottleneck_dim=-2"]),
    (["--stage1-epochs", "5", "--two-stage"], lambda: TrainConfig(epochs=2, stage1_epochs=5),
     ["stage1_epochs=5", "[0, epochs=2)"]),
    (["--device", "nope"], lambda: resolve_device("nope"), ["device='nope' is not a device"]),
    (["--device", "cuda:99"], lambda: resolve_device("cuda:99"), ["device='cuda:99', but"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "args, python, fragments", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES]
)
def test_invalid_options_are_refused_alike_by_the_cli_and_python(args, python, fragments, tmp_path):
    with pytest.raises(ConfigError) as info:
        python()
    assert "\n" not in str(info.value)
    assert all(f in str(info.value) for f in fragments), str(info.value)
    out = tmp_path / "run"
    result = cli("train", "--data", DATA, "--out", out, "--epochs", "2", "--quiet", *args)
    assert_user_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_a_huge_option_value_is_refused_in_one_bounded_line(tmp_path):
    deep = "[" * 100_000  # not JSON a parser can nest: taken as text, refused by FSQ
    assert parse_options([f"levels={deep}"]) == {"levels": deep}
    result = cli("train", "--data", DATA, "--out", tmp_path / "run", "--option", f"levels={deep}")
    line = assert_user_error(result, "FSQ: levels='[[[[")
    assert len(line) <= 1000 + len("stabq: error: ") and line.endswith("...")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text, line",
    [('{"epoch": 1}\n{"epoch": 2', 2), ("[1]\n", 1), ("\n\n" + "[" * 10**5, 3)],
    ids=["cut-short", "not-an-object", "nested-too-deeply"],
)
def test_a_damaged_metrics_file_is_refused_naming_its_line(text, line, good_model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(good_model, d)
    (d / "metrics.jsonl").write_text(text)
    with pytest.raises(ModelFileError) as info:
        load_history(d)
    assert str(info.value) == f"{d / 'metrics.jsonl'}: line {line} is not a JSON object"
    (d / "metrics.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(ModelFileError, match=r"metrics\.jsonl: unreadable"):
        load_history(d)


# --- usage errors (unknown options, values of the wrong type): one line too ------------------


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "-q", "levels=abc"], "No such option: -q"),
        (
            ["train", "--data", DATA, "--out", "o", "--epochs", "abc"],
            "Invalid value for '--epochs'",
        ),
        (["train", "--out", "o"], "Missing option '--data'"),
        (["levels"], "Missing argument 'codebook_size'"),
        (["nope"], "No such command 'nope'"),
    ],
    ids=["unknown-option", "wrong-type", "missing-option", "missing-argument", "unknown-command"],
)
def test_usage_errors_are_one_line_with_exit_status_2(
    argv, fragment, monkeypatch, capsys, tmp_path
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["stabq", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    assert info.value.code == 2 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stabq: error: ") and fragment in lines[0], lines
    assert "--help)" in lines[0] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, code", [([], 2), (["--help"], 0), (["levels", "256"], 0)])
def test_help_and_answers_are_unchanged_by_the_one_line_usage_errors(
    argv, code, monkeypatch, capsys
):
    monkeypatch.setattr("sys.argv", ["stabq", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    assert info.value.code == code and captured.err == ""
    assert ("Usage:" in captured.out) == (argv != ["levels", "256"])
    assert ("8,6,5" in captured.out) == (argv == ["levels", "256"])


def test_process_unknown_option_exits_2_in_one_line():
    proc = run_stabq("train", "-q", "levels=abc")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "stabq: error: No such option: -q (see: python -m stabq train --help)"
    ]


# --- an output path that is a file --------------------------------------------------------

COMPARE_ONE = ("--data", DATA, "--methods", "fsq", "--seeds", "1", "--epochs", "1", "--quiet")
OUT_COMMANDS = {
    "train": lambda out: cli("train", "--data", DATA, "--out", out, "--epochs", "1", "--quiet"),
    "compare": lambda out: cli("compare", *COMPARE_ONE, "--out", out),
}


@pytest.mark.parametrize("inside", [False, True], ids=["the-file", "a-path-inside-it"])
@pytest.mark.parametrize("command", list(OUT_COMMANDS))
def test_an_out_that_is_a_file_is_one_line_and_the_file_stays(command, inside, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("the user's own file\n")
    out = existing / "run" if inside else existing
    before = listing(tmp_path)
    result = OUT_COMMANDS[command](out)
    where = f"is inside {existing}, which exists" if inside else "exists"
    assert_user_error(result, f"{out}: {where} and is not a directory", "give a new path")
    assert listing(tmp_path) == before


def test_python_refuses_a_file_as_the_model_or_checkpoint_directory(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("the user's own file\n")
    torch.manual_seed(0)
    model = BottleneckClassifier(4, 3, "fsq", hidden=8, bottleneck_dim=4, levels=[3, 3])
    data = (np.random.default_rng(0).standard_normal((30, 4)), np.arange(30) % 3)
    config = TrainConfig(epochs=1, progress=False)
    with pytest.raises(stabq.errors.CheckpointError, match=r"notes\.txt: exists and is not a"):
        stabq.train(model, data, config=config, checkpoint_dir=existing)
    with pytest.raises(ModelFileError, match=r"notes\.txt: exists and is not a directory"):
        save_model(model, existing, classes=CLASSES)
    assert existing.read_text() == "the user's own file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --- an --out on a read-only filesystem that already holds a model -------------------------


@pytest.fixture(params=["simulated", "mounted"])
def model_on_read_only_fs(request, good_model, tmp_path, monkeypatch) -> Path:
    """``good_model`` copied to a filesystem that then turned read-only: simulated in this
    process (any user), or a real tmpfs remounted read-only (root only, else skipped)."""
    root = tmp_path / "fs"
    with contextlib.ExitStack() as stack:
        seal = stack.enter_context(mounted_tmpfs(root)) if request.param == "mounted" else None
        shutil.copytree(good_model, root / "m")
        if seal is None:
            read_only(monkeypatch, root)
        else:
            seal()
        yield root / "m"


def test_train_into_a_read_only_model_directory_is_one_line_and_keeps_the_model(
    model_on_read_only_fs,
):
    d = model_on_read_only_fs
    before = listing(d)
    result = cli("train", "--data", DATA, "--out", d, "--epochs", "1", "--quiet")
    assert_user_error(result, f"stabq: error: {d}: cannot write there (Read-only file system)")
    assert listing(d) == before
    torch.manual_seed(0)
    model = BottleneckClassifier(4, 3, "fsq", hidden=8, bottleneck_dim=4, levels=[3, 3])
    data = (np.random.default_rng(0).standard_normal((30, 4)), np.arange(30) % 3)
    config = TrainConfig(epochs=1, progress=False)
    with pytest.raises(CheckpointError) as info:
        stabq.train(model, data, config=config, checkpoint_dir=d)
    assert str(info.value).startswith(f"{d}: cannot write there (Read-only file system)")
    with pytest.raises(ModelFileError) as info:
        save_model(model, d, classes=CLASSES)
    assert str(info.value) == f"{d}: cannot write the model there (Read-only file system)"
    assert listing(d) == before
    assert stabq.load(d).classes == CLASSES
