"""What a model scores: eval-mode figures on rows, and the untrained model's references.

``forward_chunks`` is the one eval-mode pass of a model over rows, chunk by chunk on
the model's own device (rows in memory, on any device, or read from a file);
``evaluate_model`` gives loss, accuracy and codebook health from it;
``reference_figures`` the untrained model's figures that the guard starts from.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from stabq import distributed
from stabq.health.usage import CodebookUsage
from stabq.model.classifier import BottleneckClassifier
from stabq.quantizers.base import QuantizerOutput
from stabq.training.batches import RowReader

Features = torch.Tensor | RowReader  # rows in memory, or read per batch from a file
CHUNK = 4096  # rows a chunk of the eval-mode pass
HEALTH_FIGURES = (
    "usage",
    "fill",
    "codes_used",
    "perplexity",
    "dead_codes",
    "entropy_bits",
)  # of a row


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU for a model of neither)."""
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()  # around each step of the generator, not while the caller runs
def forward_chunks(
    model: BottleneckClassifier, x: Features, batch_size: int = CHUNK
) -> Iterator[tuple[torch.Tensor, QuantizerOutput]]:
    """The eval-mode pass of ``model`` over ``x``, ``batch_size`` rows at a time.

    Each chunk is moved to the model's device first, so rows kept on the CPU (or read
    from a file by a :class:`~stabq.rows.RowReader`) meet a model on a GPU; no gradient
    is recorded, and the model's training mode is restored when the pass ends.

    Args:
        model: a :class:`~stabq.BottleneckClassifier` (any module whose forward returns
            ``(logits, QuantizerOutput)``).
        x: ``(N, ...)`` rows, a tensor on any device or a RowReader.
        batch_size: rows a chunk.
    Yields:
        ``(logits, out)`` per chunk: ``(n, classes)`` and the quantizer's output, on the
        model's device.

    Example::

        codes = torch.cat([out.indices.cpu() for _, out in forward_chunks(model, x)])
    """
    device, was_training = model_device(model), model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            yield model(x[start : start + batch_size].to(device))
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_model(
    model: BottleneckClassifier,
    x: Features,
    y: torch.Tensor,
    batch_size: int = CHUNK,
    *,
    sync: bool = False,
    keep_indices: bool = False,
    keep_predictions: bool = False,
    health: bool = True,
) -> dict[str, Any]:
    """Eval-mode loss, accuracy and codebook health of ``model`` on ``(x, y)``, in one pass
    (:func:`forward_chunks`, on the model's device wherever ``x`` and ``y`` are).

    Returns ``loss``, ``accuracy`` and the :class:`~stabq.metrics.CodebookUsage` figures
    ``usage``, ``fill``, ``codes_used``, ``perplexity``, ``dead_codes`` (None for a grid)
    and ``entropy_bits``; with ``keep_indices`` also ``indices``, the codes of every row
    on the CPU (``(N,)`` or ``(N, C)``); with ``keep_predictions`` also ``predictions``,
    the predicted class of every row on the CPU (``(N,)``, long). ``sync=True``
    (distributed): ``(x, y)`` is this rank's share of the rows and the figures are over
    all ranks' rows (the kept indices and predictions are this rank's); every rank must
    call it. ``health=False``: loss and accuracy alone (no codes counted).
    """
    usage = CodebookUsage.for_quantizer(model.quantizer) if health else None
    if usage is not None:
        usage.sync = sync
    loss_sum, correct, kept, predicted = 0.0, 0, [], []
    start = 0
    for logits, out in forward_chunks(model, x, batch_size):
        yb = y[start : start + logits.shape[0]].to(logits.device)
        start += logits.shape[0]
        loss_sum += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
        guess = logits.argmax(-1)
        correct += int((guess == yb).sum())
        if usage is not None:
            usage.update(out.indices)
        if keep_indices:
            kept.append(out.indices.cpu())
        if keep_predictions:
            predicted.append(guess.cpu())
    codes = usage.compute() if usage is not None else None  # counts summed over ranks first
    totals = torch.tensor([loss_sum, correct, x.shape[0]], dtype=torch.float64)
    if sync:
        distributed.all_reduce_sum_(totals)
    loss_sum, correct, n = totals[0].item(), totals[1].item(), max(1.0, totals[2].item())
    figures = {"loss": loss_sum / n, "accuracy": correct / n}
    if codes is not None:
        figures.update({k: codes[k] for k in HEALTH_FIGURES})
    if keep_indices:
        figures["indices"] = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
    if keep_predictions:
        empty = torch.zeros(0, dtype=torch.long)
        figures["predictions"] = torch.cat(predicted) if predicted else empty
    return figures


@torch.no_grad()
def reference_figures(
    model: BottleneckClassifier,
    x: Features,
    y: torch.Tensor,
    vx: Features,
    vy: torch.Tensor,
):
    """Eval-mode loss, largest feature and input norms of the untrained model on clean rows,
    its validation loss, and the validation loss of predicting the class frequencies.

    Eval mode changes no buffer and draws no random number, so training is as without it.
    """
    was_training = model.training
    model.eval()
    logits, out, z = model.forward_with_features(x)
    val_loss = evaluate_model(model, vx, vy, health=False)["loss"]
    model.train(was_training)
    loss = float(F.cross_entropy(logits.float(), y) + out.loss)
    norm = float(z.norm(dim=-1).max()) if z.numel() else 0.0
    freq = torch.bincount(vy).double() / max(1, vy.numel())
    chance = float(-(freq[freq > 0] * freq[freq > 0].log()).sum())
    return loss, norm, _input_norm(model, x), val_loss, chance


def standardized(model: BottleneckClassifier, x: torch.Tensor) -> torch.Tensor:
    """The batch as the model sees it (the guard compares these rows' norms)."""
    return (x - model.feature_mean) / model.feature_std


def _input_norm(model: BottleneckClassifier, x: torch.Tensor) -> float:
    """The largest row norm of the standardised batch (inf or nan when it is not finite)."""
    if not x.numel():
        return 0.0
    return float(standardized(model, x).flatten(1).norm(dim=1).max())
