"""Integer inputs stay token ids: never standardised or cast to float on their way to the
encoder, recorded in the model directory, and checked against its vocabulary, with one line
naming the file, the row and the position of a bad id."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

import stabq
from bad_input import assert_user_error, cli, listing
from stabq.data import from_arrays, is_ids, vocab_of
from stabq.errors import ConfigError, DataError, ShapeError
from stabq.model.classifier import check_id_tensor

FACTORY = """
import torch
from torch import nn

SEEN = []  # the dtype and values each forward receives


class Enc(nn.Module):
    def __init__(self, vocab, out_dim):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.out = nn.Linear(16, out_dim)

    def forward(self, x):
        SEEN.append((x.dtype, x.detach().clone()))
        return self.out(self.emb(x).mean(1))


def encoder(input_shape, out_dim):
    return Enc(50, out_dim)
"""
SMALL = ["--epochs", "2", "--hidden", "16", "--bottleneck-dim", "8", "--quiet"]


def token_file(path, n=200, length=12, vocab=50, seed=0):
    """Token ids in ``[1, vocab)``, int64 ``(n, length)``; the class is the first token's half."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab, size=(n, length)).astype(np.int64)
    np.savez(path, x=x, y=(x[:, 0] >= vocab // 2).astype(np.int64))
    return path


def refused_alike(project, model: str, data: str, message: str) -> None:
    """``evaluate`` and ``encode`` of ``model`` on ``data``: each one line holding
    ``message``, exit status 2, and nothing in ``project`` written or changed."""
    before = listing(project)
    assert_user_error(cli("evaluate", model, "--data", data), message)
    assert_user_error(cli("encode", model, "--data", data, "--out", "c.npy"), message)
    assert listing(project) == before


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "tokenc.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_integer_arrays_stay_ids_and_one_byte_ones_stay_images():
    ids = from_arrays(np.array([[3, 0, 7], [1, 2, 0]], dtype=np.int32), [0, 1])
    assert ids.x.dtype == np.int64 and ids.x.tolist() == [[3, 0, 7], [1, 2, 0]]
    assert is_ids(ids.x) and vocab_of(ids) == 8
    images = from_arrays(np.array([[255, 0]], dtype=np.uint8).repeat(2, 0), [0, 1])
    assert images.x.dtype == np.float32 and images.x[0].tolist() == [1.0, 0.0]
    assert vocab_of(images) is None and vocab_of(from_arrays(np.ones((2, 2)), [0, 1])) is None


def test_a_negative_id_is_refused_naming_its_row_and_position():
    x = np.zeros((4, 6), dtype=np.int64)
    x[2, 5] = -3
    with pytest.raises(DataError, match=r"^arrays: row 2, position 5: token id -3, allowed is"):
        from_arrays(x, [0, 1, 0, 1])


def test_the_model_checks_ids_before_any_lookup():
    x = torch.tensor([[1, 2, 3], [4, 9, 0]])
    assert check_id_tensor(x, 10).dtype == torch.int64
    with pytest.raises(ShapeError, match=r"^row 1, position 1: token id 12, allowed"):
        check_id_tensor(torch.tensor([[1, 2, 3], [4, 12, 0]]), 10)
    with pytest.raises(ShapeError, match="float32: the model takes token ids"):
        check_id_tensor(x.float(), 10)


def test_a_user_embedding_encoder_trains_evaluates_and_encodes_on_ids(project):
    token_file(project / "tok.npz")
    assert cli("train", "--data", "tok.npz", "--encoder", "tokenc:encoder", "--quantizer",
               "fsq", *SMALL, "--out", "m").exit_code == 0  # fmt: skip
    config = json.loads((project / "m" / "config.json").read_text())["model"]
    assert (config["vocab_size"], config["pad_id"]) == (50, 0)
    import tokenc

    dtypes = {dtype for dtype, _ in tokenc.SEEN}
    assert dtypes == {torch.int64}  # never cast to float
    seen = torch.cat([x for _, x in tokenc.SEEN if len(x) > 2])  # not the 2-row shape probe
    data = np.load(project / "tok.npz")["x"]
    assert set(seen.flatten().tolist()) <= set(data.flatten().tolist())  # never standardised
    evaluated = cli("evaluate", "m", "--data", "tok.npz", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["rows"] == 200
    assert cli("encode", "m", "--data", "tok.npz", "--out", "codes.npy").exit_code == 0
    assert np.load(project / "codes.npy").shape == (200, 1)
    back = stabq.load(project / "m")
    assert back.vocab_size == 50 and back.config() == config


def test_float_data_for_an_id_model_and_ids_for_a_feature_model_are_one_line(project):
    token_file(project / "tok.npz")
    assert cli("train", "--data", "tok.npz", "--encoder", "tokenc:encoder", "--quantizer",
               "fsq", *SMALL, "--out", "ids").exit_code == 0  # fmt: skip
    x = np.load(project / "tok.npz")["x"]
    y = np.load(project / "tok.npz")["y"]
    np.savez(project / "floats.npz", x=x.astype(np.float32), y=y)
    refused_alike(project, "ids", "floats.npz",
                  "floats.npz: float32 features, but the model in ids takes token ids")  # fmt: skip
    assert cli("train", "--data", "floats.npz", "--quantizer", "fsq", *SMALL,
               "--out", "feats").exit_code == 0  # fmt: skip
    refused = cli("evaluate", "feats", "--data", "tok.npz")
    assert_user_error(refused, "tok.npz: integer token ids, but the model in feats takes")


def test_an_id_outside_the_vocabulary_is_refused_naming_file_row_and_position(project):
    token_file(project / "tok.npz")
    assert cli("train", "--data", "tok.npz", "--encoder", "tokenc:encoder", "--quantizer",
               "fsq", *SMALL, "--out", "m").exit_code == 0  # fmt: skip
    x = np.load(project / "tok.npz")["x"]
    x[17, 4] = 50  # the vocabulary is [0, 50)
    np.savez(project / "oov.npz", x=x, y=np.zeros(len(x), np.int64))
    refused_alike(project, "m", "oov.npz",
                  "oov.npz: row 17, position 4: token id 50, allowed is an id in")  # fmt: skip


def test_a_feature_encoder_refuses_ids_in_one_line(project):
    token_file(project / "tok.npz")
    assert_user_error(cli("train", "--data", "tok.npz", "--quantizer", "fsq", *SMALL,
                          "--out", "m"), "encoder 'mlp' takes features, not token ids")  # fmt: skip
    with pytest.raises(ConfigError, match="vocab_size=1, allowed is an integer >= 2"):
        stabq.BottleneckClassifier(4, 2, encoder="tokenc:encoder", vocab_size=1)
    with pytest.raises(ConfigError, match=r"pad_id=9, allowed is an id in \[0, vocab_size=5\)"):
        stabq.BottleneckClassifier(4, 2, encoder="tokenc:encoder", vocab_size=5, pad_id=9)


def test_the_builtin_token_encoders_train_on_the_same_file(project):
    token_file(project / "tok.npz")
    for encoder in ("transformer", "bag"):
        trained = cli("train", "--data", "tok.npz", "--encoder", encoder, "--quantizer", "fsq",
                      *SMALL, "--option", "d_model=16", "--out", encoder)  # fmt: skip
        assert trained.exit_code == 0, trained.output
        config = json.loads((project / encoder / "config.json").read_text())["model"]
        assert config["encoder_options"] == {"d_model": 16} and config["quantizer_kwargs"] == {}
        assert cli("evaluate", encoder, "--data", "tok.npz").exit_code == 0
        assert cli("encode", encoder, "--data", "tok.npz", "--out", "c.npy").exit_code == 0
    back = stabq.load(project / "transformer")
    assert back.projector.tokens.embedding_dim == 16  # the option reached the encoder


@pytest.mark.parametrize("quantizer", ["fsq", "vq", "rvq"])
def test_a_classifiers_output_does_not_depend_on_the_padding_after_a_sequence(quantizer):
    """The same weights in a model for rows of 24 and one for rows of 40 (its extra
    positions random): the same sequences, padded to 24 or to 40, give the same bits."""

    def build(length: int) -> stabq.BottleneckClassifier:
        torch.manual_seed(0)
        return stabq.BottleneckClassifier(
            length, 3, quantizer, hidden=16, bottleneck_dim=8, encoder="transformer",
            vocab_size=30, encoder_options={"d_model": 16, "layers": 1}, dropout=0.0,
        ).eval()  # fmt: skip

    short, long = build(24), build(40)
    weights = short.state_dict()
    positions = "projector.positions.weight"
    weights[positions] = torch.cat([weights[positions], long.state_dict()[positions][24:]])
    for unused in ("feature_mean", "feature_std"):  # shaped by the length; ids ignore them
        weights[unused] = long.state_dict()[unused]
    long.load_state_dict(weights)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 11, 2, 8])
    rows = torch.randint(1, 30, (4, 24), generator=g)
    rows[torch.arange(24) >= lengths[:, None]] = 0
    with torch.no_grad():
        padded_24 = short(rows)
        padded_40 = long(torch.nn.functional.pad(rows, (0, 16)))
        alone = [short(rows[i : i + 1, : int(lengths[i])].contiguous()) for i in range(4)]
    assert torch.equal(padded_24[0], padded_40[0])
    assert torch.equal(padded_24[1].indices, padded_40[1].indices)
    for i, (logits, _) in enumerate(alone):  # each row alone: other batch mates, rounding
        assert torch.allclose(logits[0], padded_24[0][i], atol=1e-5), i


def test_lengths_in_an_npz_pad_each_row_after_its_end(tmp_path):
    x = np.arange(1, 13, dtype=np.int64).reshape(3, 4)
    np.savez(tmp_path / "t.npz", x=x, y=np.array([0, 1, 0]), lengths=np.array([4, 1, 0]))
    data = stabq.data.load_data(str(tmp_path / "t.npz"))
    assert data.x.tolist() == [[1, 2, 3, 4], [5, 0, 0, 0], [0, 0, 0, 0]]
    np.savez(tmp_path / "bad.npz", x=x, y=np.array([0, 1, 0]), lengths=np.array([4, 5, 0]))
    with pytest.raises(DataError, match="row 1: length 5, allowed is 0 to 4"):
        stabq.data.load_data(str(tmp_path / "bad.npz"))


def test_swap_quantizers_works_behind_a_transformer_encoder():
    torch.manual_seed(0)
    model = stabq.BottleneckClassifier(8, 2, "vq-ema", hidden=16, bottleneck_dim=8,
                                       encoder="transformer", vocab_size=12)  # fmt: skip
    stabq.swap_quantizers(model, "fsq", classes=[type(model.quantizer)])
    logits, _ = model(torch.randint(0, 12, (5, 8)))
    assert logits.shape == (5, 2) and type(model.quantizer).__name__ == "FSQ"


def test_the_estimator_takes_integer_x_as_ids_for_a_token_encoder():
    from stabq.estimator import DiscreteBottleneckClassifier

    rng = np.random.default_rng(0)
    X = rng.integers(1, 20, size=(120, 8))
    y = np.where(X[:, 0] > 10, "long", "short")
    clf = DiscreteBottleneckClassifier(encoder="bag", epochs=2, random_state=0).fit(X, y)
    assert clf.model_.vocab_size == 20
    assert set(clf.predict(X)) <= {"long", "short"} and clf.transform(X).shape == (120, 1)
    with pytest.raises(DataError, match="float64 values, but encoder 'bag' takes token ids"):
        clf.predict(X.astype(np.float64))
    with pytest.raises(ShapeError, match="token id 25"):  # outside the fitted vocabulary
        clf.predict(np.full((2, 8), 25))


def test_compare_trains_every_method_on_token_ids_and_checks_the_test_ids(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(1, 30, size=(160, 10))
    y = (x[:, 0] > 15).astype(np.int64)
    result = stabq.compare((x, y), methods="none,fsq", seeds=1, epochs=1, progress=False,
                           encoder="bag", test_data=(x[:40], y[:40]))  # fmt: skip
    assert [row["method"] for row in result.rows] == ["none", "fsq"]
    with pytest.raises(DataError, match="token id 30, allowed is an id in"):
        stabq.compare((x, y), methods="none", seeds=1, epochs=1, progress=False,
                      encoder="bag", test_data=(np.full((4, 10), 30), y[:4]))  # fmt: skip


def test_two_stage_training_and_the_report_work_on_token_ids(tmp_path):
    from stabq.report import write_comparison

    rng = np.random.default_rng(0)
    x = rng.integers(1, 30, size=(160, 10))
    y = (x[:, 0] > 15).astype(np.int64)
    torch.manual_seed(0)
    model = stabq.BottleneckClassifier(10, 2, "vq", hidden=16, bottleneck_dim=8,
                                       encoder="transformer", vocab_size=30,
                                       encoder_options={"d_model": 16, "layers": 1})  # fmt: skip
    config = stabq.TrainConfig(epochs=3, two_stage=True, stage1_epochs=1, progress=False)
    result = stabq.train(model, (x, y), config=config)
    assert [row["stage"] for row in result.history] == [1, 2, 2]
    assert result.history[0]["quantized"] is False and result.history[-1]["quantized"] is True
    compared = stabq.compare((x, y), methods="none,vq-2stage", seeds=1, epochs=2,
                             progress=False, encoder="bag")  # fmt: skip
    out = write_comparison(compared, tmp_path / "report")
    assert (out / "report.html").is_file() and "vq-2stage" in (out / "report.md").read_text()
