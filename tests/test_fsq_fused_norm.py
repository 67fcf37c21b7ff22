"""FSQ's pre_norm folded into its bound (stabq.quantizers.fsq_norm) against the unfused form:
nn.BatchNorm1d(affine=False) followed by FSQ without pre_norm, in training and at eval,
forward (codes, indices, running statistics) and backward."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stabq
from fsq_pairs import LEVELS, pair, run_both
from stabq.quantizers import fsq_norm


@settings(max_examples=40, deadline=None)
@given(
    levels=st.sampled_from(LEVELS),
    rows=st.integers(2, 70),
    training=st.booleans(),
    bound=st.sampled_from(["tanh", "distribution"]),
    momentum=st.sampled_from([0.1, 0.5, None]),
    scale=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_batch_norm_then_fsq_float64(
    levels, rows, training, bound, momentum, scale, seed
):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fsq_norm, "PACKED_MIN_ELEMENTS", 0)
        _compare_float64(levels, rows, training, bound, momentum, scale, seed)


def _compare_float64(levels, rows, training, bound, momentum, scale, seed):
    fused, reference, plain = pair(levels, bound, torch.float64, momentum)
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, len(levels), generator=gen, dtype=torch.float64) + 0.3) * scale
    upstream = torch.randn(rows, len(levels), generator=gen, dtype=torch.float64)
    fused.train(training)
    assert fused._fused(z.clone()) is not None  # the fused form is what runs
    fused, reference, plain = pair(levels, bound, torch.float64, momentum)
    out, grad, ref, ref_grad = run_both(fused, reference, plain, z, training, upstream)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-9)
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(fused.pre_norm.state_dict()[name], buffer, rtol=1e-12, atol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bound", ["tanh", "distribution"])
def test_fused_float32_large_batch_agrees(training, bound):
    """The default threshold (the sigmoid form too): float32, up to float rounding."""
    rows = fsq_norm.PACKED_MIN_ELEMENTS // 6 + 16
    fused, reference, plain = pair(LEVELS[0], bound, torch.float32)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(rows, 6, generator=gen) * 3 + 1
    upstream = torch.randn(rows, 6, generator=gen)
    out, grad, ref, ref_grad = run_both(fused, reference, plain, z, training, upstream)
    same = out.indices == ref.indices
    assert same.float().mean() > 0.9999  # rows within float rounding of a boundary may move
    torch.testing.assert_close(out.quantized[same], ref.quantized[same])
    torch.testing.assert_close(grad[same], ref_grad[same], rtol=1e-4, atol=1e-5)
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(fused.pre_norm.state_dict()[name], buffer, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [1e30, float("nan"), float("inf")])
@pytest.mark.parametrize("training", [True, False])
def test_beyond_the_clamp_runs_the_unfused_form(bad, training, monkeypatch):
    """Where pre_normalise's clamp would change z (or z is not finite), the result is the
    unfused form's, bit for bit."""
    monkeypatch.setattr(fsq_norm, "PACKED_MIN_ELEMENTS", 0)
    fused, reference, plain = pair(LEVELS[1], "tanh", torch.float32)
    z = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    z[3, 2] = bad
    upstream = torch.randn(32, 4)
    out, grad, ref, ref_grad = run_both(fused, reference, plain, z, training, upstream)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fused.pre_norm.running_var, reference.running_var, equal_nan=True)


@pytest.mark.parametrize("packed_from", [0, 2**30], ids=["packed", "torch's batch norm"])
def test_kept_graph_backward_twice_gives_the_same_gradient(monkeypatch, packed_from):
    monkeypatch.setattr(fsq_norm, "PACKED_MIN_ELEMENTS", packed_from)
    q = stabq.FSQ(LEVELS[0], pre_norm=True).train()
    z = torch.randn(40, 6, requires_grad=True)
    out = q(z).quantized
    upstream = torch.randn(40, 6)
    first = torch.autograd.grad(out, z, upstream, retain_graph=True)[0]
    second = torch.autograd.grad(out, z, upstream)[0]
    assert torch.equal(first, second)


def test_saved_pre_norm_state_loads():
    """The pre_norm buffers keep their names: a state dict saved by the unfused form loads,
    and eval uses its running statistics."""
    levels = LEVELS[0]
    old = {
        "pre_norm.running_mean": torch.linspace(-1, 1, 6),
        "pre_norm.running_var": torch.linspace(0.5, 2, 6),
        "pre_norm.num_batches_tracked": torch.tensor(7),
    }
    q = stabq.FSQ(levels, pre_norm=True)
    q.load_state_dict(old)
    reference = torch.nn.BatchNorm1d(6, affine=False)
    reference.load_state_dict({k.split(".", 1)[1]: v for k, v in old.items()})
    z = torch.randn(fsq_norm.PACKED_MIN_ELEMENTS // 6 + 16, 6) * 2
    q.eval(), reference.eval()
    out = q(z)
    ref = stabq.FSQ(levels)(reference(z))
    assert (out.indices == ref.indices).float().mean() > 0.9999
    assert set(q.state_dict()) == set(old)
