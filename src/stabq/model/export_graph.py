"""The module an export traces: a trained classifier's evaluation pass in plain operations.

    x (n, *input_shape) -> (x - mean) / std -> encoder -> z -> quantizer pass -> q
    h = mix * q + (1 - mix) * z        (mix = 1 once quantization is ramped in)
    logits = head(h), codes = the quantizer's indices

Token ids are not standardised; the transformer runs over all ``L`` positions with the
padding masked (`TokenTransformer.features_of`) where its own forward cuts each batch to
its longest row first, a length read from the data that a graph cannot hold.
"""

from __future__ import annotations

from torch import Tensor, nn

from stabq.model.classifier import BottleneckClassifier
from stabq.model.export_quantizers import quantizer_graph
from stabq.model.transformer import TokenTransformer


class ExportGraph(nn.Module):
    """``model``'s evaluation pass: inputs to ``(logits, codes)``, or ``logits`` alone for a
    continuous model (preset ``none``)."""

    def __init__(self, model: BottleneckClassifier) -> None:
        super().__init__()
        self.model = model
        self.quantizer = quantizer_graph(model.quantizer, model.arch["quantizer"])
        self.mix = float(model.quantize_mix)

    def features(self, x: Tensor) -> Tensor:
        encoder = self.model.projector
        if self.model.vocab_size is not None:
            ids = x.long()
            if isinstance(encoder, TokenTransformer):
                return encoder.features_of(ids)
            return encoder(ids)
        x = x.to(self.model.feature_mean.dtype)
        return encoder((x - self.model.feature_mean) / self.model.feature_std)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        z = self.features(x)
        if self.quantizer is None:
            return self.model.head(z)
        q, codes = self.quantizer(z)
        if self.mix < 1.0:
            q = self.mix * q + (1.0 - self.mix) * z
        return self.model.head(q), codes


def graph_of(model: BottleneckClassifier) -> ExportGraph:
    """An :class:`ExportGraph` of ``model`` in evaluation mode (``model`` itself unchanged
    but for its training flag, which the caller restores)."""
    model.eval()
    return ExportGraph(model).eval()


__all__ = ["ExportGraph", "graph_of"]
