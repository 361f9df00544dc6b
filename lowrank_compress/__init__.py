"""lowrank_compress: low-rank compression of pretrained PyTorch models by nonlinear kernel projection.

The public API is the ten names in ``__all__``; everything else is importable from its module
(``lowrank_compress.io.opening.open_model``, ``lowrank_compress.gaussian.function_error``, …)
but not re-exported::

    import lowrank_compress as lrc
    the_plan = lrc.plan(model, lrc.CompressConfig(target_params=0.5), example_inputs)  # checks, changes nothing
    model, report = lrc.compress(model, lrc.CompressConfig(target_params=0.5), example_inputs,
                                 calibration=batches)
    lrc.save(model, "model.lrc.safetensors", arch="torchvision:resnet50")
    model = lrc.load("model.lrc.safetensors")
"""

from .compress import CompressConfig, CompressReport, compress, plan
from .io.format import load, save
from .layers import LowRankConv1d, LowRankConv2d, LowRankLinear
from .projection import factorize
from .version import __version__

__all__ = [
    "CompressConfig",
    "CompressReport",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "compress",
    "factorize",
    "load",
    "plan",
    "save",
]
