"""How to feed a model: its eval preprocessing (data config) and a default example input shape."""

from __future__ import annotations

from typing import Any

from torch import nn

from .checks import file_metadata
from .records import DataConfig


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision_config(name: str) -> dict[str, Any]:
    import torchvision

    try:
        weights = list(torchvision.models.get_model_weights(name))
    except (ValueError, KeyError):
        return {}
    if not weights:
        return {}
    tf = weights[0].transforms()
    crop = getattr(tf, "crop_size", [224])
    resize = getattr(tf, "resize_size", [256])
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    resize = resize[0] if isinstance(resize, (list, tuple)) else resize
    return {
        "input_size": (3, int(crop), int(crop)),
        "mean": tuple(getattr(tf, "mean", IMAGENET_MEAN)),
        "std": tuple(getattr(tf, "std", IMAGENET_STD)),
        "interpolation": str(getattr(tf, "interpolation", "bilinear")).split(".")[-1].lower(),
        "crop_pct": float(crop) / float(resize),
    }


def data_config(arch: str | None, model: nn.Module, metadata: dict[str, str] | None = None) -> DataConfig:
    """Eval preprocessing for a model: input_size (C, H, W), mean, std, interpolation, crop_pct."""
    meta = file_metadata(metadata or {}, "the file")
    config: dict[str, Any] = {}
    if arch and arch.startswith("timm:"):
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        config = {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct") if k in cfg}
    elif arch and arch.startswith("torchvision:"):
        config = _torchvision_config(arch.split(":", 1)[1])
    for key in ("mean", "std"):
        if key in meta:
            config[key] = meta[key]
    if "input_shape" in meta:
        config["input_size"] = meta["input_shape"][1:]
    return DataConfig.from_dict(config)


def default_input_shape(arch: str | None, model: nn.Module, metadata: dict[str, str] | None = None) -> tuple[int, ...] | None:
    """A batch-1 example input shape from the file's metadata, the arch config, or the first layer."""
    meta = file_metadata(metadata or {}, "the file")
    if "input_shape" in meta:
        return meta["input_shape"]
    shape = getattr(model, "default_input_shape", None)
    if shape:
        return tuple(shape)
    cfg = data_config(arch, model, meta)
    if cfg.input_size is not None and (arch or "").split(":")[0] in ("timm", "torchvision"):
        return (1, *cfg.input_size)
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):
        return (1, first.in_features)
    return None
