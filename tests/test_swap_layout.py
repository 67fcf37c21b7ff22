"""swap_quantizers on a user's own quantizer class: the replacement returns what it returned.

The user here wrote a VQ-EMA by hand, as many do, returning ``(quantized, loss,
indices)``, and a training loop that unpacks it in that order. After the swap
the loop runs unchanged: ``loss`` is the preset's auxiliary loss (a float
scalar), the indices are the preset's, and backward works. What cannot be told
apart is refused in one line asking for ``returns=``.
"""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stabq
from stabq import ConfigError, swap
from stabq.swap import swap_quantizers


class MyVQ(nn.Module):
    """A hand-written VQ-EMA: returns ``(quantized, loss, indices)``; counts its calls."""

    def __init__(self, dim: int, codebook_size: int = 16, decay: float = 0.99) -> None:
        super().__init__()
        self.dim, self.decay = dim, decay
        self.register_buffer("embed", torch.randn(codebook_size, dim))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, z):
        self.calls += 1  # every call, in any mode: a probe of the original would show here
        flat = z.reshape(-1, self.dim)
        indices = torch.cdist(flat, self.embed).argmin(-1)
        q = self.embed[indices].view_as(z)
        if self.training:
            means = torch.zeros_like(self.embed).index_add_(0, indices, flat.detach())
            self.embed.mul_(self.decay).add_((1 - self.decay) * means)
        loss = 0.25 * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), loss, indices.view(z.shape[:-1])


class UserNet(nn.Module):
    def __init__(self, vq: nn.Module) -> None:
        super().__init__()
        self.enc, self.vq, self.head = nn.Linear(8, 16), vq, nn.Linear(16, 3)

    def forward(self, x):
        q, loss, indices = self.vq(self.enc(x))  # the user's unpacking, in MyVQ's order
        return self.head(q.mean(1)), loss, indices


@pytest.mark.parametrize("preset", ["fsq", "vq"])
def test_a_users_vq_returning_quantized_loss_indices_keeps_its_order(preset):
    torch.manual_seed(0)
    model = UserNet(MyVQ(16))
    original = model.vq
    before = {k: v.clone() for k, v in original.state_dict().items()}
    options = {"levels": [8, 8]} if preset == "fsq" else {"codebook_size": 16}
    report = swap_quantizers(model, preset, classes=[MyVQ], **options)
    assert str(report).splitlines()[1] == (
        f"  vq: test_swap_layout.MyVQ -> {preset} (dim 16, returns (quantized, loss, indices))"
    )
    assert isinstance(model.vq, swap.SwappedCustom) and report[0].returns.names[1] == "loss"
    x, y = torch.randn(32, 5, 8), torch.randint(0, 3, (32,))
    logits, loss, indices = model.train()(x)  # the user's training step, unchanged
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert indices.shape == (32, 5) and indices.dtype == torch.long
    (F.cross_entropy(logits, y) + loss).backward()
    assert model.enc.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the preset's own outputs on the same input
        model.eval()
        z = model.enc(x)
        _, loss, indices = model(x)
        want = report[0].quantizer(z)
    assert torch.equal(indices, want.indices) and torch.equal(loss, want.loss)
    if preset == "vq":
        assert float(loss) > 0  # a commitment loss, not a stand-in zero
    for key, value in original.state_dict().items():  # the probe ran a copy
        assert torch.equal(value, before[key]), key


class Stacked(nn.Module):
    """Reads ``(b, n, dim)`` only, so a ``(2, dim)`` probe fails; returns ``(q, loss, idx)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x):
        if x.dim() != 3:
            raise ValueError(f"expected (b, n, dim), found {tuple(x.shape)}")
        return x.round(), x.square().mean(), x.round().long().sum(-1)


def test_returns_names_the_layout_of_a_module_a_probe_cannot_run():
    with pytest.raises(ConfigError) as e:
        swap_quantizers(nn.Sequential(Stacked(6)), "fsq", classes=[Stacked])
    message = str(e.value)
    assert "\n" not in message and "0 (test_swap_layout.Stacked)" in message
    assert "raised ValueError" in message and "pass returns=(" in message
    model = nn.Sequential(Stacked(6))
    report = swap_quantizers(
        model, "fsq", classes=[Stacked], returns=("quantized", "loss", "indices")
    )
    q, loss, indices = model[0](torch.randn(4, 3, 6))
    assert q.shape == (4, 3, 6) and loss.dim() == 0 and indices.dtype == torch.long
    assert str(report[0]).endswith("(dim 6, returns (quantized, loss, indices))")
    model = nn.Sequential(Stacked(6))
    swap_quantizers(model, "vq", classes=[Stacked], returns="quantized", codebook_size=8)
    out = model[0](torch.randn(4, 3, 6))
    assert isinstance(out, torch.Tensor) and out.shape == (4, 3, 6)


def test_perplexity_by_returns_is_the_batch_codes_perplexity():
    model = nn.Sequential(Stacked(6))
    returns = ["quantized", "indices", "loss", "perplexity"]
    swap_quantizers(model, "vq", classes=["Stacked"], returns=returns, codebook_size=16)
    _, indices, _, perplexity = model[0].eval()(torch.randn(50, 4, 6))
    usage = stabq.CodebookUsage(16)
    usage.update(indices)
    assert perplexity.dim() == 0 and perplexity.dtype == torch.float32
    assert float(perplexity) == pytest.approx(usage.compute()["perplexity"], rel=1e-5)


Out = namedtuple("Out", "codes quantized commitment")


class Shaped(nn.Module):
    """Returns ``kind``'s container: indices int32 first, a ``(1,)`` loss last."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        self.dim, self.kind = dim, kind

    def forward(self, x):
        found = (x.round().sum(-1).int(), x.round(), x.square().mean().reshape(1))
        return {"list": list, "namedtuple": lambda t: Out(*t)}[self.kind](found)


@pytest.mark.parametrize("kind", ["list", "namedtuple"])
def test_the_container_order_loss_shape_and_index_dtype_are_the_originals(kind):
    model = nn.Sequential(Shaped(5, kind))
    swap_quantizers(model, "fsq", classes=[Shaped], levels=[5, 5, 5])
    out = model[0](torch.randn(3, 7, 5))
    assert type(out) is {"list": list, "namedtuple": Out}[kind]
    indices, q, loss = out
    assert indices.dtype == torch.int32 and indices.shape == (3, 7) and q.shape == (3, 7, 5)
    assert loss.shape == (1,) and loss.dtype == torch.float32


class Returns(nn.Module):
    """A module returning ``make(x)``: one of the layouts a probe cannot map."""

    def __init__(self, dim: int, make) -> None:
        super().__init__()
        self.dim, self.make = dim, make

    def forward(self, x):
        return self.make(x)


AMBIGUOUS = {  # name: (what the forward returns, what the message says)
    "two floats of the input's shape": (
        lambda x: (x.round(), x, x.long().sum(-1)),
        "returns a tuple (float32 (2, 4), float32 (2, 4), int64 (2,)) for a float32 (2, 4) "
        "input: more than one output looks like quantized",
    ),
    "a dict": (
        lambda x: {"quantized": x, "indices": x.long()},
        "returns a dict, not a tensor, tuple or list",
    ),
    "one-hot encodings": (
        lambda x: (x.mean(), x, F.one_hot(x.argmax(-1), 16).float()),
        "output 3 is none of quantized",
    ),
    "a forward that raises": (lambda x: x.view(3, -1), "raised RuntimeError: "),
}


@pytest.mark.parametrize("case", list(AMBIGUOUS))
def test_outputs_that_cannot_be_told_apart_are_refused_in_one_line(case):
    make, says = AMBIGUOUS[case]
    model = nn.ModuleDict({"q": Returns(4, make)})
    with pytest.raises(ConfigError) as e:
        swap_quantizers(model, "fsq", classes=[Returns])
    message = str(e.value)
    assert "\n" not in message and message.startswith("swap_quantizers: q (test_swap_layout.")
    assert says in message and message.endswith("e.g. returns=('quantized', 'loss', 'indices')")
    assert isinstance(model["q"], Returns)  # nothing replaced


def test_bad_returns_are_one_line_errors():
    model = nn.Sequential(Stacked(6))
    with pytest.raises(ConfigError, match=r"returns=\('quantized', 'codes'\), allowed is"):
        swap_quantizers(model, classes=[Stacked], returns=("quantized", "codes"))
    with pytest.raises(ConfigError, match=r"returns=.*each at most once"):
        swap_quantizers(model, classes=[Stacked], returns=("loss", "loss"))
    with pytest.raises(ConfigError, match="returns= describes the classes named in classes="):
        swap_quantizers(model, returns="quantized")
    assert isinstance(model[0], Stacked)


def test_collapse_monitor_reads_a_swapped_module_in_the_users_order():
    model = UserNet(MyVQ(16))
    swap_quantizers(model, "vq", classes=[MyVQ], codebook_size=16)
    with stabq.CollapseMonitor(model.vq, warn=False) as monitor:
        model(torch.randn(8, 4, 8))
    figures = monitor.report()
    assert figures["samples"] == 32 and figures["loss"] is not None and figures["loss"] > 0
