"""Quantizers by preset name, and the FSQ paper's recommended levels.

| preset      | what it builds                                                        |
|-------------|-----------------------------------------------------------------------|
| ``fsq``       | FSQ [8,8,8,5,5,5] (64,000 codes) with ``pre_norm=True``               |
| ``fsq-plain`` | textbook FSQ [8,8,8,5,5,5], no normalisation (can saturate tanh)      |
| ``rvq``       | residual VQ 4 x 256, k-means init, dead codes under 2 replaced        |
| ``vq-ema``    | vanilla VQ-EMA, 512 codes: the baseline that collapses                |
| ``vq``        | VQ 512 codes, k-means init, dead codes at 2, 32-dim cosine codebook,  |
|             | EMA decay 0.95                                                        |
| ``gumbel``    | Gumbel-Softmax over 32 codes, tau 5.0 -> 0.1, ``pre_norm=True``,      |
|             | diversity loss 1.0 (wav2vec 2.0's)                                    |
| ``pq``        | product quantization, 8 subspaces x 256 codes, k-means init, dead     |
|             | codes under 2 replaced (as ``rvq``)                                   |
| ``simvq``     | SimVQ 1024 codes: frozen random basis times one learned linear layer, |
|             | rotation trick                                                        |
| ``rfsq``      | residual FSQ [8,5,5,5] (1,000 codes) x 4 layers, ``pre_norm=True``    |
| ``lfq``       | lookup-free quantization, 16 bits (65,536 codes), entropy penalty 0.1,|
|             | commitment 0.25                                                       |
| ``bsq``       | ``lfq`` on the unit sphere (binary spherical quantization)            |
| ``none``      | continuous pass-through (the reference)                               |
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from stabq.errors import ConfigError, check, is_int
from stabq.quantizers.base import Identity, Quantizer
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
    """FSQ levels for about ``codebook_size`` codes (Mentzer et al. 2023, table 1)."""
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


PRESETS: dict[str, tuple[Callable[..., Quantizer], Callable[[int], dict]]] = {
    "fsq": (FSQ, lambda dim: {"levels": FSQ_LEVELS[2**16], "pre_norm": True}),
    "fsq-plain": (FSQ, lambda dim: {"levels": FSQ_LEVELS[2**16]}),
    "rvq": (
        ResidualVQ,
        lambda dim: {
            "num_quantizers": 4,
            "codebook_size": 256,
            "kmeans_init": True,
            "dead_code_threshold": 2.0,
        },
    ),
    "vq-ema": (VectorQuantizer, lambda dim: {"codebook_size": 512}),
    "vq": (VectorQuantizer, _vq_repaired),
    # pre_norm and the diversity loss: without them the explode preset's SGD left the
    # logits untrained and the test inputs on 3 to 8 codes (README, "Why VQ-EMA blows up")
    "gumbel": (GumbelQuantizer, lambda dim: {"pre_norm": True, "diversity_weight": 1.0}),
    # k-means init and dead-code replacement, as rvq: without them every subspace fell onto
    # one code under the explode preset's SGD (perplexity 1.0, 3 seeds), where with them it
    # kept 57-62% of its codes (README, "Why VQ-EMA blows up")
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
    "simvq": (SimVQ, lambda dim: {"codebook_size": 1024, "rotation_trick": True}),
    "rfsq": (
        ResidualFSQ,
        lambda dim: {"levels": FSQ_LEVELS[2**10], "num_quantizers": 4, "pre_norm": True},
    ),
    # commitment 0.25 bounds z: without it (the peer's default) the entropy penalty let the
    # encoder output grow 135x and overflow under the explode preset's SGD, and under the
    # default Adam the MLP reached 17.5% on mnist1d (62.0% with it; 1 seed each)
    "lfq": (LFQ, lambda dim: {"bits": 16, "commitment_weight": 0.25}),
    "bsq": (LFQ, lambda dim: {"bits": 16, "spherical": True}),
    "none": (Identity, lambda dim: {}),
}


def preset_names() -> list[str]:
    """The preset names :func:`build_quantizer` accepts."""
    return list(PRESETS)


def build_quantizer(name: str, dim: int, **overrides) -> Quantizer:
    """Build the preset ``name`` for inputs of size ``dim``; ``overrides`` replace its options."""
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


__all__ = ["PRESETS", "build_quantizer", "preset_names", "recommended_levels"]
