"""Quantizers by preset name (:func:`build_quantizer`, whose docstring lists the presets),
and the FSQ paper's recommended levels (:func:`recommended_levels`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from stabq.errors import ConfigError, check, is_int
from stabq.quantizers.base import Identity, Quantizer
from stabq.quantizers.fsp import FSP
from stabq.quantizers.fsq import FSQ
from stabq.quantizers.gumbel import GumbelQuantizer
from stabq.quantizers.lfq import LFQ
from stabq.quantizers.pq import ProductQuantizer
from stabq.quantizers.rfsq import ResidualFSQ
from stabq.quantizers.rvq import ResidualVQ
from stabq.quantizers.simvq import SimVQ
from stabq.quantizers.vq import VectorQuantizer

FSQ_LEVELS = {
    2**8: [8, 6, 5],
    2**10: [8, 5, 5, 5],
    2**12: [7, 5, 5, 5, 5],
    2**14: [8, 8, 8, 6, 5],
    2**16: [8, 8, 8, 5, 5, 5],
}


def recommended_levels(codebook_size: int) -> list[int]:
    """FSQ levels for about `codebook_size` codes, as the FSQ paper recommends them.

    The levels of Mentzer et al. 2023, table 1: their product is near `codebook_size`
    (240, 1,000, 4,375, 15,360 and 64,000 codes).

    Args:
        codebook_size: the codebook size wanted: one of 256, 1024, 4096, 16384 and
            65536 (2^8, 2^10, 2^12, 2^14, 2^16).

    Returns:
        A new list of levels per code dimension, for `FSQ(levels)` or `levels=` of the
        `fsq`, `fsq-plain` and `rfsq` presets.

    Raises:
        ConfigError: `codebook_size` is not one of the five sizes.

    Examples:
        >>> import stabq
        >>> stabq.recommended_levels(2**10)
        [8, 5, 5, 5]
        >>> stabq.FSQ(stabq.recommended_levels(2**10), dim=64).codebook_size
        1000
    """
    check(
        is_int(codebook_size) and codebook_size in FSQ_LEVELS,
        f"recommended_levels: codebook_size={codebook_size!r}, allowed is one of "
        f"{sorted(FSQ_LEVELS)} (2^8, 2^10, 2^12, 2^14, 2^16)",
    )
    return list(FSQ_LEVELS[codebook_size])


def _vq_repaired(dim: int) -> dict:
    # EMA decay 0.95 (a horizon of 20 steps, not 100): the codebook must follow an encoder
    # that trains with it. Measured on mnist1d, 3 seeds: with the CNN encoder 93.8% against
    # 91.3% at 0.99 (one seed stuck at 86%); at lr 3e-2 without guards 49.8% against 38.0%;
    # with the MLP 70.3% against 71.2% (within its spread).
    return {
        "codebook_size": 512,
        "kmeans_init": True,
        "dead_code_threshold": 2.0,
        "codebook_dim": 32 if dim > 32 else None,
        "cosine": True,
        "decay": 0.95,
    }


def _diveq(dim: int) -> dict:
    # no cosine (a learned codebook leaves the sphere), no k-means, no projection: measured on
    # mnist1d with the MLP (20 epochs, 2 seeds) 66.4% against 59.5% with vq's k-means and
    # 32-dim codebook (k-means seeded on the untrained encoder's first batch: 5 codes used
    # at epoch 1, a loss of 10.7 at epoch 2); decay 0.99 (a 100-step horizon) 55.4%.
    # pre_norm: under the stress preset (AdamW lr 3e-2, no guards, 3 seeds) the features grew
    # to norms of 2e3-6e3 away from the codes and training died at 9.3%; with it 51.0%
    return {
        "codebook_size": 512,
        "dead_code_threshold": 2.0,
        "decay": 0.95,
        "directional_reparam": True,
        "pre_norm": True,
    }


_RVQ = {"num_quantizers": 4, "codebook_size": 256, "kmeans_init": True, "dead_code_threshold": 2.0}

PRESETS: dict[str, tuple[Callable[..., Quantizer], Callable[[int], dict]]] = {
    "fsq": (FSQ, lambda dim: {"levels": FSQ_LEVELS[2**16], "pre_norm": True}),
    "fsq-plain": (FSQ, lambda dim: {"levels": FSQ_LEVELS[2**16]}),
    # the normal CDF, half the training values quantized, variance target 1 (the peer's README
    # example); pre_norm: without it the dimensions collapse onto one or two directions under
    # stress and explode (46-47 of 1,000 cells filled, 195 and 436 with it; mnist1d, 3 seeds)
    "fsp": (
        FSP,
        lambda dim: {
            "levels": FSQ_LEVELS[2**16],
            "activation": "normal",
            "quantize_rate": 0.5,
            "vector_norm": "var",
            "pre_norm": True,
        },
    ),
    # 4 bits per dimension (iFSQ's best) and pre_norm: on mnist1d (MLP, 2 seeds) 71.8%
    # with perplexity 916 and 94% of the test inputs' cells filled, where without pre_norm
    # 70.4% and 499 (73%), and over fsq's levels 71.5% and 675 (76%); fsq 70.6% and 591.
    # tanh over [16] * 4 with pre_norm did as well (72.4%, 887): the levels make the gain
    "ifsq": (
        FSQ,
        lambda dim: {"levels": [16, 16, 16, 16], "bound": "distribution", "pre_norm": True},
    ),
    "rvq": (ResidualVQ, lambda dim: dict(_RVQ)),
    "vq-ema": (VectorQuantizer, lambda dim: {"codebook_size": 512}),
    "vq": (VectorQuantizer, _vq_repaired),
    "diveq": (VectorQuantizer, _diveq),
    "rvq-diveq": (
        ResidualVQ,
        lambda dim: {
            **_RVQ,
            "directional_reparam": True,
            "decay": 0.95,  # as diveq; with 0.99 12 of 256 codes used under explode
            "pre_norm": True,  # as diveq: stress 15.8% without, 53.6% with (3 seeds)
        },
    ),
    # pre_norm and the diversity loss: without them the explode preset's SGD left the
    # logits untrained and the test inputs on 3 to 8 codes (the CHANGELOG)
    "gumbel": (GumbelQuantizer, lambda dim: {"pre_norm": True, "diversity_weight": 1.0}),
    "gumbel-reinmax": (
        GumbelQuantizer,
        lambda dim: {
            "estimator": "reinmax",
            "tau_start": 16.0,
            "tau_end": 16.0,
            "pre_norm": True,
            "diversity_weight": 1.0,
        },
    ),
    # k-means init and dead-code replacement, as rvq: without them every subspace fell onto
    # one code under the explode preset's SGD (perplexity 1.0, 3 seeds), where with them it
    # kept 57-62% of its codes (the CHANGELOG)
    "pq": (
        ProductQuantizer,
        lambda dim: {
            "num_subspaces": 8,
            "bits": 8,
            "kmeans_init": True,
            "dead_code_threshold": 2.0,
        },
    ),
    # the rotation trick (the peer's default): straight-through, the MLP reached 43.1% on
    # mnist1d under the default preset (3 seeds, the guard rescuing all three; 61.1/66.3%
    # with a k-means basis) and its loss swung up to 25; with it 70.5%, 36% of the codes in
    # use, largest loss 2.54 (seed 0; 66.6% with a k-means basis)
    # pre_norm and W = I: with nn.Linear's random W (smallest singular value ~0.002) the
    # codebook fell onto a few directions at AdamW 3e-2 without guards (perplexity 3.4,
    # 24.8%, 3 seeds); standardised inputs and W starting at the identity: 52.4%,
    # perplexity 197. Under the explode preset's SGD 18.3% and 28% fill (10.7% before);
    # default preset 68.8% +- 1.8 against 69.6% +- 0.6 (within its uncertainty)
    "simvq": (
        SimVQ,
        lambda dim: {
            "codebook_size": 1024,
            "rotation_trick": True,
            "pre_norm": True,
            "identity_transform": True,
        },
    ),
    "rfsq": (
        ResidualFSQ,
        lambda dim: {"levels": FSQ_LEVELS[2**10], "num_quantizers": 4, "pre_norm": True},
    ),
    # commitment 0.25 bounds z: without it (the peer's default) the entropy penalty let the
    # encoder output grow 135x and overflow under the explode preset's SGD, and under the
    # default Adam the MLP reached 17.5% on mnist1d (62.0% with it; 1 seed each)
    # pre_norm centres every bit on its threshold: without it the bits drifted to one sign
    # at AdamW 3e-2 without guards (perplexity 2.0, 16.3%, 3 seeds); inv_temperature 1
    # keeps the entropy penalty's gradient alive (at 100 it saturates for |z| > 0.01).
    # With both: 45.9%, perplexity 19.7, but 6.1% fill (under-used) there: the bits were
    # balanced but moved together. decorrelation_weight 1 penalises their correlation:
    # 46.9% +- 0.5, fill 44.9%, perplexity 312 (0.1: 1 of 3 collapsed); explode 43.1%, fill
    # 90.9% (41.6%, 18.4% before); default preset 71.4% +- 2.5,
    # fill 64.1% (69.2% +- 2.0, 14.1% before; 3 seeds each)
    "lfq": (
        LFQ,
        lambda dim: {
            "bits": 16,
            "commitment_weight": 0.25,
            "pre_norm": True,
            "inv_temperature": 1.0,
            "decorrelation_weight": 1.0,
        },
    ),
    # pre_norm as lfq: without it 1 of 3 seeds collapsed at AdamW 3e-2 (2 of 3 under the
    # explode preset's SGD); with it 1 of 3 still collapsed under SGD (perplexity 4.8).
    # decorrelation_weight 1 as lfq: explode 26.7% +- 2.8, fill 96.7%, 3 of 3 ok (17.5%
    # +- 4.4 before); AdamW 3e-2 49.5%, fill 56.9% (47.5%, 13.1%); default 70.0% +- 2.1,
    # fill 66.8% (69.7% +- 1.3, 24.2%)
    "bsq": (
        LFQ,
        lambda dim: {
            "bits": 16,
            "spherical": True,
            "pre_norm": True,
            "decorrelation_weight": 1.0,
        },
    ),
    "none": (Identity, lambda dim: {}),
}


def preset_names() -> list[str]:
    """The names of the quantizer presets, in the order `build_quantizer` lists them.

    Returns:
        A new list of the preset names `build_quantizer`, `BottleneckClassifier`,
        `swap_quantizers` and the command line's `--quantizer` accept.

    Examples:
        >>> import stabq
        >>> import textwrap
        >>> print(textwrap.fill(", ".join(stabq.preset_names()), 70))
        fsq, fsq-plain, fsp, ifsq, rvq, vq-ema, vq, diveq, rvq-diveq, gumbel,
        gumbel-reinmax, pq, simvq, rfsq, lfq, bsq, none
    """
    return list(PRESETS)


def build_quantizer(name: str, dim: int, **overrides) -> Quantizer:
    """Build the quantizer preset `name` for features of size `dim`.

    A preset is a quantizer class with chosen options; `overrides` replace them or set
    others of that class (any argument of its constructor but `dim`). The presets, as
    `stabq.preset_names()` lists them:

    - `fsq`: `FSQ` with levels [8, 8, 8, 5, 5, 5] (64,000 codes) and `pre_norm=True`,
      so the bound cannot saturate.
    - `fsq-plain`: textbook `FSQ` with the same levels, without normalisation (it can
      saturate).
    - `fsp`: `FSP` (finite scalar perturbation) with levels [8, 8, 8, 5, 5, 5]
      (64,000 codes), the normal CDF, half the training values perturbed within their
      bin (`quantize_rate=0.5`), the moment loss `var` (mean 0, variance 1), and
      `pre_norm=True`, so that a high learning rate does not crowd the codes into a few
      cells.
    - `ifsq`: `FSQ` with levels [16, 16, 16, 16] (65,536 codes, 4 bits per dimension),
      `bound="distribution"` (iFSQ: `tanh(0.8 z)` over `L` whole rounding units, so every
      level is used about equally) and `pre_norm=True`.
    - `rvq`: `ResidualVQ`, 4 layers of 256 codes, k-means init, dead codes (under 2
      uses over the EMA horizon) replaced.
    - `vq-ema`: vanilla `VectorQuantizer`, 512 codes, EMA decay 0.99, no repair: the
      baseline that collapses.
    - `vq`: repaired `VectorQuantizer`, 512 codes, k-means init, dead codes replaced,
      cosine distance, a 32-dim codebook (when `dim` > 32), EMA decay 0.95.
    - `diveq`: `VectorQuantizer` with `directional_reparam=True` (DiVeQ): 512 codes
      learned by the directional gradient, no loss, dead codes (under 2 uses over 20
      steps) replaced, `pre_norm=True` so the codes need not follow the encoder's
      scale; no k-means, projection or cosine.
    - `rvq-diveq`: `ResidualVQ` with `directional_reparam=True`, 4 layers of 256 codes
      learned by DiVeQ on their sum, k-means init, dead codes replaced (as `rvq`, but
      counted over 20 steps), `pre_norm=True`.
    - `gumbel`: `GumbelQuantizer`, Gumbel-Softmax over 32 codes, tau 5.0 -> 0.1,
      `pre_norm=True`, diversity loss weight 1.0 (wav2vec 2.0's).
    - `gumbel-reinmax`: `GumbelQuantizer` with `estimator="reinmax"`: a one-hot
      Gumbel-max sample of 32 codes with ReinMax's second-order straight-through
      gradient, tau 16 (fixed), `pre_norm=True`, diversity loss weight 1.0.
    - `pq`: `ProductQuantizer`, 8 subspaces of 256 codes, k-means init, dead codes
      replaced (as `rvq`); `dim` must be a multiple of 8.
    - `simvq`: `SimVQ`, 1024 codes: a frozen random basis times one learned linear
      layer that starts at the identity, gradients by the rotation trick,
      `pre_norm=True`.
    - `rfsq`: `ResidualFSQ`, levels [8, 5, 5, 5] (1,000 codes) x 4 layers,
      `pre_norm=True`.
    - `lfq`: lookup-free `LFQ`, 16 bits (65,536 codes), `pre_norm=True`, entropy
      penalty 0.1 at inverse temperature 1, commitment 0.25, decorrelation 1.
    - `bsq`: `LFQ` with `spherical=True`, 16 bits on the unit sphere (binary spherical
      quantization), `pre_norm=True`, entropy penalty 0.1, decorrelation 1, no
      commitment term.
    - `none`: `Identity`, the continuous pass-through: the reference, with no codes.

    Args:
        name: a preset name from the list above.
        dim: the size of the features to quantize (the last dimension of the input),
            an integer >= 1.
        **overrides (Any): options of the preset's class, e.g. `levels=[8, 5, 5, 5]` for
            `fsq`, `codebook_size=1024` for `vq`; a boolean option takes only True or
            False.

    Returns:
        A new quantizer module in training mode (a `Quantizer` subclass); its forward
            maps `x (..., dim)` to a `QuantizerOutput`.

    Raises:
        ConfigError: `name` is not a preset; an override the preset's class does not
            take, or a value it does not allow (a string for a boolean option, `pq`
            with a `dim` that is not a multiple of 8, ...).

    Examples:
        >>> import torch, stabq
        >>> q = stabq.build_quantizer("fsq", 64)
        >>> quantized, indices, loss = q(torch.randn(32, 64))
        >>> quantized.shape, indices.shape, indices.dtype
        (torch.Size([32, 64]), torch.Size([32]), torch.int64)
        >>> q.codebook_size
        64000
        >>> stabq.build_quantizer("rvq", 64, num_quantizers=2)(torch.randn(8, 64)).indices.shape
        torch.Size([8, 2])
    """
    if name not in PRESETS:
        raise ConfigError(f"quantizer={name!r} is not a preset; allowed: {', '.join(PRESETS)}")
    cls, defaults = PRESETS[name]
    allowed = [p for p in inspect.signature(cls).parameters if p != "dim"]
    unknown = sorted(set(overrides) - set(allowed))
    check(
        not unknown,
        f"quantizer {name!r} ({cls.__name__}) has no option {', '.join(map(repr, unknown))}; "
        f"allowed: {', '.join(allowed) or 'none'}",
    )
    params = inspect.signature(cls).parameters
    for key, value in overrides.items():  # a truthy string must not switch a repair on
        check(
            params[key].annotation != "bool" or isinstance(value, bool),
            f"quantizer {name!r}: {key}={value!r}, allowed is true or false",
        )
    return cls(dim=dim, **{**defaults(dim), **overrides})


# Presets that do not end healthy under every condition stabq measures (the stress and
# explode comparisons on mnist1d behind the MLP and the CNN, 3 seeds; the stress benchmarks
# page), each with the condition under which not to use it. The verdict line quotes it.
_SGD = "under SGD with momentum 0.9 at lr 1e-2 without clipping or guards (explode)"
_DEFAULTS = "healthy with the defaults (AdamW at 3e-3, clipping, guards on)"
CAUTIONS: dict[str, str] = {
    "vq-ema": "the collapsing baseline, kept to reproduce the failure: not for training a model",
    "fsq-plain": (
        "saturates at high learning rates (one code and chance accuracy at AdamW 3e-2 without "
        "guards, 3 of 3 runs): use fsq, which standardises before the bound"
    ),
    "gumbel-reinmax": (
        "one-hot samples at high learning rates: at AdamW 3e-2 without guards it learned "
        "nothing in 1 of 3 runs behind the MLP and collapsed in 2 of 3 behind the CNN: use "
        "gumbel there"
    ),
    "vq": (
        "behind a CNN without guards it learned nothing, at AdamW 3e-2 (stress) and "
        f"{_SGD}, 3 of 3 runs each; {_DEFAULTS}"
    ),
    "rvq": f"behind a CNN it learned nothing {_SGD}, 3 of 3 runs; {_DEFAULTS}",
    "pq": f"behind a CNN it learned nothing {_SGD}, 3 of 3 runs; {_DEFAULTS}",
    "simvq": (
        "behind a CNN without guards: under-used at AdamW 3e-2 (stress, 5% fill) and it "
        f"learned nothing {_SGD} in 2 of 3 runs; {_DEFAULTS}"
    ),
}


def preset_caution(name: str) -> str | None:
    """When not to use preset `name`, as measured; None for a preset with no such condition.

    Args:
        name: a preset name (`preset_names()`).

    Returns:
        One line naming the condition under which the preset does not end healthy and what
            to use instead, or None.

    Raises:
        ConfigError: `name` is not a preset.

    Examples:
        >>> import stabq
        >>> stabq.preset_caution("fsq") is None
        True
        >>> stabq.preset_caution("vq-ema").startswith("the collapsing baseline")
        True
    """
    if name not in PRESETS:
        raise ConfigError(f"quantizer={name!r} is not a preset; allowed: {', '.join(PRESETS)}")
    return CAUTIONS.get(name)


__all__ = [
    "CAUTIONS",
    "PRESETS",
    "build_quantizer",
    "preset_caution",
    "preset_names",
    "recommended_levels",
]
