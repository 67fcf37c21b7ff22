"""TokenTransformer: shapes, exact padding invariance, the all-padding row, the pad
embedding's irrelevance, gradients, determinism, state_dict, and each refusal.

The invariance tests are marked ``outcome`` so that ``make test-portable`` runs them on the
other CPU kernel paths (``ATEN_CPU_CAPABILITY=default`` and ``=avx2``) too: bitwise
equality must hold whichever kernels torch picks.
"""

from __future__ import annotations

import contextlib
import doctest
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stabq.errors import ConfigError, ShapeError
from stabq.model import transformer
from stabq.model.transformer import TokenTransformer, content_length

MAX_LEN = 40
VOCAB = 11


def small(seed: int = 0, **options) -> TokenTransformer:
    """A small model, seeded: d_model 16, 2 heads, 2 layers unless told otherwise."""
    torch.manual_seed(seed)
    sizes = {"d_model": 16, "heads": 2, "layers": 2, "dropout": 0.0, **options}
    return TokenTransformer(VOCAB, MAX_LEN, 5, **sizes)


def padded(rows: list[list[int]], length: int, pad_id: int) -> torch.Tensor:
    """``rows`` as one tensor ``(N, length)``, each row followed by ``pad_id``."""
    return torch.tensor([row + [pad_id] * (length - len(row)) for row in rows], dtype=torch.long)


def run(model: TokenTransformer, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The model's output in ``mode``: train or eval, each with or without gradients."""
    model.train(mode.startswith("train"))
    with torch.no_grad() if mode.endswith("no_grad") else contextlib.nullcontext():
        return model(x)


MODES = ["train", "train no_grad", "eval", "eval no_grad"]


@pytest.mark.parametrize(
    "options",
    [{}, {"layers": 0}, {"heads": 1}, {"heads": 4, "ff": 7}, {"d_model": 8, "heads": 8}],
)
@pytest.mark.parametrize("mode", MODES)
def test_output_is_n_by_out_dim_float32(options, mode):
    model = small(**options)
    out = run(model, torch.randint(0, VOCAB, (3, 9)), mode)
    assert out.shape == (3, 5) and out.dtype == torch.float32 and out.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_any_integer_dtype_gives_what_int64_gives(dtype):
    model, x = small().eval(), torch.randint(0, VOCAB, (3, 9))
    assert torch.equal(model(x.to(dtype)), model(x))


def test_defaults_follow_the_signature():
    model = TokenTransformer(50, 32, 8)
    layer = model.layers[0]
    assert len(model.layers) == 2 and model.tokens.weight.shape == (50, 64)
    assert model.positions.weight.shape == (32, 64) and model.out.weight.shape == (8, 64)
    assert layer.linear1.out_features == 128 and layer.self_attn.num_heads == 4
    assert layer.norm_first and layer.self_attn.batch_first and layer.dropout.p == 0.1
    assert model.pad_id == 0


@st.composite
def batches(draw):
    """Rows of ids (pads inside too), and the lengths to pad them to (each >= the longest)."""
    pad_id = draw(st.sampled_from([0, 3, VOCAB - 1]))
    n = draw(st.integers(1, 4))
    token = st.integers(0, VOCAB - 1)
    rows = [draw(st.lists(token, max_size=MAX_LEN)) for _ in range(n)]
    longest = max(map(len, rows))
    extra = draw(st.lists(st.integers(longest, MAX_LEN), max_size=2))
    lengths = sorted({longest, *extra, *(t for t in (20, 32, MAX_LEN) if t >= longest)})
    return pad_id, rows, lengths


@pytest.mark.outcome  # bitwise: run on the other CPU kernel paths by make test-portable
@settings(max_examples=60, deadline=None)
@given(
    batch=batches(),
    heads=st.sampled_from([1, 2, 4]),  # odd heads keep torch's fused eval path off
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_padding_never_changes_a_bit_of_the_output(batch, heads, mode, seed):
    pad_id, rows, lengths = batch
    model = small(seed, heads=heads, pad_id=pad_id)
    outs = [run(model, padded(rows, length, pad_id), mode) for length in lengths]
    assert all(out.isfinite().all() for out in outs)
    assert all(torch.equal(out, outs[0]) for out in outs[1:]), lengths
    for row in rows:  # each row alone, padded to every length its batch was
        alone = [run(model, padded([row], length, pad_id), mode) for length in lengths]
        assert all(torch.equal(out, alone[0]) for out in alone[1:]), (row, lengths)


@pytest.mark.outcome
@settings(max_examples=20, deadline=None)
@given(batch=batches(), seed=st.integers(0, 2**16))
def test_with_dropout_padding_changes_nothing_given_the_same_random_state(batch, seed):
    pad_id, rows, lengths = batch
    model = small(seed, pad_id=pad_id, dropout=0.3).train()
    outs = []
    for length in lengths:
        torch.manual_seed(seed)
        outs.append(model(padded(rows, length, pad_id)))
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


@pytest.mark.outcome
@pytest.mark.parametrize("mode", MODES)
def test_the_default_model_pads_to_20_32_and_max_len_exactly(mode):
    torch.manual_seed(1)
    model = TokenTransformer(1000, 64, 16, dropout=0.0)
    lengths = torch.tensor([1, 5, 17, 20, 3, 11, 19, 8])
    ids = torch.randint(1, 1000, (8, 20)) * (torch.arange(20) < lengths[:, None])
    outs = [run(model, nn.functional.pad(ids, (0, total - 20)), mode) for total in (20, 32, 64)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_the_batch_is_cut_to_its_longest_non_pad_length():
    assert content_length(torch.tensor([[4, 0, 0, 0], [5, 0, 6, 0]]), 0) == 3
    assert content_length(torch.tensor([[4, 2, 2], [2, 2, 2]]), 2) == 1
    assert content_length(torch.full((3, 5), 7), 7) == 0
    assert content_length(torch.zeros(0, 5, dtype=torch.long), 0) == 0
    seen = []
    model = small()
    model.layers[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    model(padded([[1, 2, 0, 3], [4]], MAX_LEN, 0))
    assert seen == [4]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads", [1, 2])
def test_a_row_of_padding_only_gives_the_output_bias(mode, heads):
    model = small(heads=heads, pad_id=3)
    x = padded([[3, 3, 3, 3, 3], [1, 2, 3, 4], [3]], 6, 3)
    assert torch.equal(run(model, x, mode)[0], model.out.bias)  # beside other rows
    assert torch.equal(run(model, x[:1], mode)[0], model.out.bias)  # alone
    assert torch.equal(run(model, x[[0, 2]], mode), model.out.bias.expand(2, -1).detach())
    empty = run(model, torch.zeros(2, 0, dtype=torch.long), mode)  # L = 0: empty sequences
    assert torch.equal(empty, model.out.bias.expand(2, -1).detach())
    assert run(model, torch.zeros(0, 6, dtype=torch.long), mode).shape == (0, 5)


def test_no_query_ever_has_all_its_keys_masked():
    """Torch before 2.5 answers NaN to a query whose keys are all masked (later versions
    answer 0): the layers must never be asked, not even for a row of padding only."""
    masks = []
    model = small()
    for layer in model.layers:
        hook = lambda _, args, kwargs: masks.append(kwargs["src_key_padding_mask"])  # noqa: E731
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    model(padded([[0, 0, 0], [1, 0, 2, 0], [0]], 6, 0))
    assert len(masks) == 2 and not any(mask.all(dim=1).any() for mask in masks)
    assert masks[0].tolist() == [[False] * 3, [False, True, False], [False] * 3]


def test_a_row_beside_longer_rows_gives_its_output_alone_up_to_rounding():
    """Pads are masked keys: a row padded for a longer batch mate attends to its own
    tokens only (bitwise equality is not promised: the layers run on other shapes)."""
    model = small(3).eval()
    row = [4, 1, 0, 7]
    alone = model(padded([row], 4, 0))
    beside = model(padded([row, [5] * 30, [6] * 17], MAX_LEN, 0))[:1]
    torch.testing.assert_close(beside, alone, rtol=1e-5, atol=1e-6)


def test_a_batch_with_a_row_of_padding_only_has_finite_gradients():
    model = small().train()
    model(padded([[0, 0, 0], [1, 2, 3]], 5, 0)).square().sum().backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("value", [1e4, float("nan"), float("inf")])
@pytest.mark.parametrize("mode", MODES)
def test_the_pad_embedding_never_reaches_the_output(value, mode):
    model = small(pad_id=2)
    x = padded([[1, 2, 5, 2], [2, 2], [7, 8, 9, 10, 4, 2]], 9, 2)
    before = run(model, x, mode)
    with torch.no_grad():
        model.tokens.weight[2] = value
    assert torch.equal(run(model, x, mode), before)


def test_gradients_reach_the_embeddings_and_every_layer():
    model = small().train()
    model(padded([[1, 2, 0, 3], [4, 5]], 8, 0)).square().sum().backward()
    tokens, positions = model.tokens.weight.grad, model.positions.weight.grad
    assert tokens[[1, 2, 3, 4, 5]].abs().sum(dim=1).gt(0).all()
    assert tokens[[0, 6, 7]].eq(0).all()  # the pad id and the ids not seen
    # position 2 is padding in both rows: it is never a key nor pooled, so it gets nothing
    assert positions[[0, 1, 3]].abs().sum(dim=1).gt(0).all()
    assert positions[2:3].eq(0).all() and positions[4:].eq(0).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name


def test_the_same_seed_builds_and_runs_the_same_model():
    x = torch.randint(0, VOCAB, (4, 12))
    outs = []
    for _ in range(2):
        model = small(5, dropout=0.2).train()
        outs.append(model(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(small(6)(x), small(5)(x))


def test_a_state_dict_round_trip_gives_the_same_outputs():
    model, x = small(1).eval(), torch.randint(0, VOCAB, (4, 12))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = small(2).eval()
    assert not torch.equal(other(x), model(x))
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other(x), model(x))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"vocab_size": 1}, "vocab_size=1, allowed is an integer >= 2"),
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"vocab_size": 10.0}, "vocab_size=10.0"),
        ({"max_len": 0}, "max_len=0, allowed is an integer >= 1"),
        ({"out_dim": 0}, "out_dim=0"),
        ({"out_dim": True}, "out_dim=True"),
        ({"d_model": 0}, "d_model=0"),
        ({"heads": 0}, "heads=0"),
        ({"d_model": 30}, "d_model=30 with heads=4, allowed is a multiple of heads"),
        ({"layers": -1}, "layers=-1, allowed is an integer >= 0"),
        ({"ff": 0}, "ff=0, allowed is an integer >= 1"),
        ({"ff": 2.5}, "ff=2.5"),
        ({"dropout": 1.0}, "dropout=1.0, allowed is a number 0 <= dropout < 1"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"dropout": float("nan")}, "dropout=nan"),
        ({"dropout": "0.1"}, "dropout='0.1'"),
        ({"pad_id": 10}, "pad_id=10, allowed is an integer 0 <= pad_id < vocab_size=10"),
        ({"pad_id": -1}, "pad_id=-1"),
        ({"pad_id": None}, "pad_id=None"),
    ],
)
def test_each_bad_size_is_refused(options, message):
    sizes = {"vocab_size": 10, "max_len": 8, "out_dim": 3, **options}
    with pytest.raises(ConfigError) as err:
        TokenTransformer(
            sizes.pop("vocab_size"), sizes.pop("max_len"), sizes.pop("out_dim"), **sizes
        )
    assert str(err.value).startswith(f"TokenTransformer: {message}")


class Untouchable(nn.Embedding):
    """An embedding that fails the test when looked up."""

    def forward(self, ids):
        raise AssertionError("the embedding was looked up")


@pytest.mark.parametrize(
    "x, message",
    [
        ([[1, 2]], "input is a list, expected a tensor (N, L) of ids"),
        (torch.tensor([1, 2]), "input of shape (2), expected (N, L) token ids"),
        (torch.ones(2, 3, 4, dtype=torch.long), "input of shape (2, 3, 4), expected (N, L)"),
        (torch.ones(2, 3), "input of dtype torch.float32, expected integer token ids"),
        (torch.ones(2, 3, dtype=torch.bool), "input of dtype torch.bool"),
        (torch.ones(2, 9, dtype=torch.long), "input of shape (2, 9) is longer than max_len=8"),
        (
            torch.tensor([[1, 2], [3, -1]]),
            "row 1, position 1: id -1, allowed is 0 <= id < 10 (vocab_size)",
        ),
        (torch.tensor([[1, 10, 11]]), "row 0, position 1: id 10, allowed is 0 <= id < 10"),
        (torch.tensor([[1, 2, 3], [4, 12, 5], [-3, 0, 0]]), "row 1, position 1: id 12"),
        (torch.tensor([[1, 2, 3], [-7, 12, 5]], dtype=torch.int8), "row 1, position 0: id -7"),
    ],
)
def test_each_bad_input_is_refused_in_one_line_before_any_lookup(x, message):
    model = TokenTransformer(10, 8, 3)
    model.tokens, model.positions = Untouchable(10, 64), Untouchable(8, 64)
    with pytest.raises(ShapeError) as err:
        model(x)
    assert str(err.value).startswith(f"TokenTransformer: {message}")
    assert "\n" not in str(err.value)


def test_the_docstring_examples_run():
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(transformer, globs={}):
        runner.run(test, out=lambda _: None)
    failed, attempted = runner.summarize(verbose=False)
    assert attempted >= 10 and failed == 0
