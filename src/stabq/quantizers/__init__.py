"""Quantizers: one method a file, one interface (:class:`Quantizer`)."""

from stabq.quantizers.base import Identity, Quantizer, QuantizerOutput
from stabq.quantizers.codebook import Codebook, kmeans, nearest_code
from stabq.quantizers.fsp import FSP
from stabq.quantizers.fsq import FSQ
from stabq.quantizers.gumbel import GumbelQuantizer
from stabq.quantizers.lfq import LFQ
from stabq.quantizers.pq import ProductQuantizer
from stabq.quantizers.registry import (
    PRESETS,
    build_quantizer,
    preset_caution,
    preset_names,
    recommended_levels,
)
from stabq.quantizers.rfsq import ResidualFSQ
from stabq.quantizers.rvq import ResidualVQ
from stabq.quantizers.simvq import SimVQ
from stabq.quantizers.vq import VectorQuantizer

__all__ = [
    "FSP",
    "FSQ",
    "LFQ",
    "PRESETS",
    "Codebook",
    "GumbelQuantizer",
    "Identity",
    "ProductQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "ResidualFSQ",
    "ResidualVQ",
    "SimVQ",
    "VectorQuantizer",
    "build_quantizer",
    "kmeans",
    "nearest_code",
    "preset_caution",
    "preset_names",
    "recommended_levels",
]
