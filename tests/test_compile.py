"""TrainConfig(compile=True): the quantizer runs through torch.compile and computes the same."""

from __future__ import annotations

import torch

from stabq import BottleneckClassifier, TrainConfig, train
from stabq.data import load_data


def test_compile_option_trains_with_a_compiled_quantizer_that_matches_eager():
    data = load_data("synthetic:16", "train")
    torch.manual_seed(0)
    model = BottleneckClassifier(16, 10, quantizer="fsq", hidden=32, bottleneck_dim=16)
    assert model.quantizer._compiled_call_impl is None
    result = train(model, data, config=TrainConfig(epochs=1, compile=True, progress=False))
    assert model.quantizer._compiled_call_impl is not None  # the compiled call is in use
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.history[0]["val_accuracy"] > 0.2  # 10 classes: chance is 0.1
    z = torch.randn(64, 16)
    compiled = model.quantizer(z)
    eager = model.quantizer.forward(z)  # forward() bypasses the compiled __call__
    assert torch.equal(compiled.indices, eager.indices)
    torch.testing.assert_close(compiled.quantized, eager.quantized)
