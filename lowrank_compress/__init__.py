"""lowrank_compress: low-rank compression of pretrained PyTorch models by nonlinear kernel projection."""

from .activations import ACTIVATIONS
from .layers import LowRankConv1d, LowRankConv2d, LowRankLinear, from_dense
from .projection import (
    Factorization,
    factorize,
    function_error,
    function_error_mc,
    kernel_projection,
    output_energy,
    refine,
    spectral_factors,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Factorization",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "factorize",
    "from_dense",
    "function_error",
    "function_error_mc",
    "kernel_projection",
    "output_energy",
    "refine",
    "spectral_factors",
]
