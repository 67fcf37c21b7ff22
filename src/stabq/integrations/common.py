"""What stabq's training-framework callbacks share, with no framework imported: finding the
quantizers in a model, the figures they log, and where a batch's inputs are.

`stabq.integrations.lightning` and `stabq.integrations.transformers` build on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stabq.errors import ConfigError
from stabq.health.probe import read_output
from stabq.health.usage import CodebookUsage
from stabq.quantizers.base import Quantizer

PEER_CLASSES = {"VectorQuantize", "ResidualVQ", "FSQ", "ResidualFSQ", "LFQ", "SimVQ"}
FIGURES = {  # CollapseMonitor.report() key -> logged name
    "usage": "usage",
    "fill": "fill",
    "codes_used": "codes_used",
    "perplexity": "perplexity",
    "dead_codes": "dead_codes",
    "entropy_bits": "entropy_bits",
    "top_codes": "top_codes",
    "loss": "aux_loss",
    "input_norm": "feature_norm",
    "saturation": "saturation",
}
PER_CODEBOOK = ("usage", "fill", "perplexity", "dead_codes", "entropy_bits")


def is_quantizer(module: nn.Module) -> bool:
    """Whether a module is a quantizer the callbacks watch.

    Args:
        module: any module.

    Returns:
        True for stabq's quantizers (not the continuous `Identity`) and
            vector-quantize-pytorch's `VectorQuantize`, `ResidualVQ`, `FSQ`,
            `ResidualFSQ`, `LFQ` and `SimVQ`.

    Examples:
        >>> import stabq
        >>> from stabq.integrations.common import is_quantizer
        >>> is_quantizer(stabq.build_quantizer("fsq", 8)), is_quantizer(stabq.Identity(8))
        (True, False)
    """
    if isinstance(module, Quantizer):
        return module.codebook_size >= 1
    kind = type(module)
    return kind.__module__.startswith("vector_quantize_pytorch") and kind.__name__ in PEER_CLASSES


def find_quantizers(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The outermost quantizers of a model (not those inside another), by module path.

    Args:
        model: the model to search.
        names: module paths to pick among those found; default None: all.

    Returns:
        A dict from module path to quantizer (`"quantizer"` for the model itself).

    Raises:
        ConfigError: no quantizer found, or a name in `names` that is not one.

    Examples:
        >>> import stabq
        >>> from stabq.integrations.common import find_quantizers
        >>> model = stabq.BottleneckClassifier(8, 2, "rvq", hidden=16, bottleneck_dim=8)
        >>> list(find_quantizers(model))
        ['quantizer']
    """
    found: dict[str, nn.Module] = {}

    def walk(path: str, module: nn.Module) -> None:
        if is_quantizer(module):
            found[path or "quantizer"] = module
            return
        for name, child in module.named_children():
            walk(f"{path}.{name}" if path else name, child)

    walk("", model)
    if names is not None:
        missing = [n for n in names if n not in found]
        if missing:
            raise ConfigError(
                f"no quantizer at {', '.join(missing)} in {type(model).__name__}; "
                f"found: {', '.join(found) or 'none'}"
            )
        found = {n: found[n] for n in names}
    if not found:
        raise ConfigError(
            f"found no quantizer in {type(model).__name__} (stabq's, or vector-quantize-"
            f"pytorch's {', '.join(sorted(PEER_CLASSES))}); name them with modules="
        )
    return found


def _figures(report: Mapping[str, Any]) -> dict[str, float]:
    """The loggable numbers of a monitor report (or a CodebookUsage result)."""
    out = {FIGURES[k]: float(v) for k, v in report.items() if k in FIGURES and v is not None}
    per = report.get("per_codebook") or []
    if len(per) > 1:
        for k, entry in enumerate(per):
            figures = {key: entry[key] for key in PER_CODEBOOK if entry[key] is not None}
            out.update({f"{key}/{k}": float(v) for key, v in figures.items()})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def count_eval_codes(usage: CodebookUsage) -> Callable:
    """A forward hook that counts a quantizer's codes into `usage` in evaluation mode only.

    Args:
        usage: the tally to update.

    Returns:
        The hook, for `module.register_forward_hook`.

    Examples:
        >>> import torch, stabq
        >>> from stabq.integrations.common import count_eval_codes
        >>> q = stabq.FSQ([5, 5]).eval()
        >>> usage = stabq.CodebookUsage(25)
        >>> handle = q.register_forward_hook(count_eval_codes(usage))
        >>> _ = q(torch.zeros(4, 2))
        >>> usage.compute()["samples"]
        4
    """

    @torch.compiler.disable
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if not module.training:
            usage.update(read_output(output)[0].detach())

    return hook


def first_tensor(batch: Any) -> Tensor:
    """The inputs of a batch, as `GuardCallback` reads them by default.

    Args:
        batch: a tensor, a sequence whose first item is a tensor, or a mapping with
            `"x"`, `"input"` or `"inputs"`.

    Returns:
        The batch itself, its first item, or that entry.

    Raises:
        ConfigError: none of these forms.

    Examples:
        >>> import torch
        >>> from stabq.integrations.common import first_tensor
        >>> first_tensor((torch.zeros(4, 3), torch.ones(4))).shape
        torch.Size([4, 3])
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("x", "input", "inputs"):
            if key in batch:
                return batch[key]
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise ConfigError(
        "GuardCallback: cannot find the inputs in a batch of type "
        f"{type(batch).__name__}; pass input=lambda batch: ..."
    )


def float_input(batch: Any) -> Tensor | None:
    """The inputs the Trainer's `GuardCallback` checks by default: a batch's first float tensor.

    Args:
        batch: the Trainer's batch, a mapping of tensors (or a tensor).

    Returns:
        The batch itself if a float tensor, its first float entry, or None (token ids
            only: nothing to check).

    Examples:
        >>> import torch
        >>> from stabq.integrations.common import float_input
        >>> float_input({"input_ids": torch.ones(2, 3, dtype=torch.long), "x": torch.zeros(2)})
        tensor([0., 0.])
    """
    values = batch.values() if isinstance(batch, Mapping) else [batch]
    return next((v for v in values if isinstance(v, Tensor) and v.is_floating_point()), None)


__all__ = ["count_eval_codes", "find_quantizers", "first_tensor", "float_input", "is_quantizer"]
