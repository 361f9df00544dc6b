"""lowrank_compress: low-rank compression of pretrained PyTorch models by nonlinear kernel projection.

The Python API mirrors the CLI::

    import lowrank_compress as lrc
    model, report = lrc.compress(model, lrc.CompressConfig(target_params=0.5), example_inputs,
                                 calibration=batches)
    lrc.save(model, "model.lrc.safetensors", arch="torchvision:resnet50")
    model = lrc.load("model.lrc.safetensors")
"""

from .activations import ACTIVATIONS
from .checkpoint import build_model, load_model, open_model
from .compress import CompressConfig, CompressReport, LayerReport, compress, count_flops, count_params, plan
from .graph import LayerSite, find_sites
from .layers import LowRankConv1d, LowRankConv2d, LowRankLinear, from_dense
from .projection import (
    Factorization,
    error_curve,
    factorize,
    function_error,
    function_error_mc,
    kernel_projection,
    output_energy,
    refine,
    spectral_factors,
)
from .serialization import load, read_manifest, save

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "CompressConfig",
    "CompressReport",
    "Factorization",
    "LayerReport",
    "LayerSite",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "build_model",
    "compress",
    "count_flops",
    "count_params",
    "error_curve",
    "factorize",
    "find_sites",
    "from_dense",
    "function_error",
    "function_error_mc",
    "kernel_projection",
    "load",
    "load_model",
    "open_model",
    "output_energy",
    "plan",
    "read_manifest",
    "refine",
    "save",
    "spectral_factors",
]
