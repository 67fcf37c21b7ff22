"""What a model scores: eval-mode figures on rows, and the untrained model's references.

``evaluate_model`` gives loss, accuracy and codebook health; ``_reference_figures``
the untrained model's figures that the guard starts from.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from stabq import distributed
from stabq.metrics import CodebookUsage
from stabq.model import BottleneckClassifier
from stabq.rows import RowReader

Features = torch.Tensor | RowReader  # rows in memory, or read per batch from a file


@torch.no_grad()
def evaluate_model(
    model: BottleneckClassifier,
    x: Features,
    y: torch.Tensor,
    batch_size: int = 4096,
    *,
    sync: bool = False,
) -> dict[str, Any]:
    """Eval-mode loss, accuracy and codebook health of ``model`` on ``(x, y)``.

    ``sync=True`` (distributed): ``(x, y)`` is this rank's share of the rows
    and the figures are over all ranks' rows; every rank must call it.
    """
    was_training = model.training
    model.eval()
    usage = CodebookUsage.for_quantizer(model.quantizer)
    usage.sync = sync
    loss_sum, correct = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits, out = model(xb)
        loss_sum += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
        usage.update(out.indices)
    model.train(was_training)
    health = usage.compute()
    totals = torch.tensor([loss_sum, correct, x.shape[0]], dtype=torch.float64)
    if sync:
        distributed.all_reduce_sum_(totals)
    loss_sum, correct, n = totals[0].item(), totals[1].item(), max(1.0, totals[2].item())
    return {
        "loss": loss_sum / n,
        "accuracy": correct / n,
        "usage": health["usage"],
        "perplexity": health["perplexity"],
        "dead_codes": health["dead_codes"],
        "entropy_bits": health["entropy_bits"],
    }


@torch.no_grad()
def _reference_figures(
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
    val_loss = evaluate_model(model, vx, vy)["loss"]
    model.train(was_training)
    loss = float(F.cross_entropy(logits.float(), y) + out.loss)
    norm = float(z.norm(dim=-1).max()) if z.numel() else 0.0
    freq = torch.bincount(vy).double() / max(1, vy.numel())
    chance = float(-(freq[freq > 0] * freq[freq > 0].log()).sum())
    return loss, norm, _input_norm(model, x), val_loss, chance


def _standardized(model: BottleneckClassifier, x: torch.Tensor) -> torch.Tensor:
    """The batch as the model sees it (the guard compares these rows' norms)."""
    return (x - model.feature_mean) / model.feature_std


def _input_norm(model: BottleneckClassifier, x: torch.Tensor) -> float:
    """The largest row norm of the standardised batch (inf or nan when it is not finite)."""
    if not x.numel():
        return 0.0
    return float(_standardized(model, x).flatten(1).norm(dim=1).max())
