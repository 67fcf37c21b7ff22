"""The model: the classifier (encoder -> quantizer -> head), its encoders, saving and
loading, and swapping the quantizers of a model of one's own."""

from stabq.model.classifier import BottleneckClassifier

__all__ = ["BottleneckClassifier"]
