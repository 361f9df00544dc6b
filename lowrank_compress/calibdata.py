"""Calibration inputs from disk: image folders, tensor files, or Gaussian samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UsageError

_TENSOR_SUFFIXES = (".npy", ".pt", ".pth", ".bin", ".safetensors")


def _tensor_file(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UsageError(f"cannot read calibration file {path} ({exc})") from None
        return torch.from_numpy(np.ascontiguousarray(array))
    if path.suffix == ".safetensors":
        from .io.reading import read_safetensors_metadata

        read_safetensors_metadata(path)
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        from .io.reading import read_torch

        obj = read_torch(path, trust_pickle=False)
        tensors = obj if isinstance(obj, dict) else {"x": obj}
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    for key in ("x", "inputs", "input", "images", "x_test", "x_train", "data"):
        if key in tensors:
            return tensors[key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise UsageError(f"calibration file {path} holds {len(tensors)} float tensors; name the inputs 'x'")


def calibration_batches(
    spec: str,
    input_shape: tuple[int, ...],
    data_config: dict[str, Any],
    samples: int,
    batch_size: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Calibration inputs as a list of batches of shape (b, *input_shape[1:]).

    ``spec``: ``gaussian``, an image folder (class subfolders or flat, eval-transformed to the input
    shape), or a tensor file (.npy, .pt via weights_only, .safetensors) whose first axis indexes
    samples.
    """
    if samples < 1 or batch_size < 1:
        raise UsageError("--calib-samples and --calib-batch-size must be ≥ 1")
    per_sample = tuple(input_shape[1:])
    if spec == "gaussian":
        gen = torch.Generator().manual_seed(seed + 1)
        data = torch.randn((samples, *per_sample), generator=gen)
    else:
        path = Path(spec)
        if not path.exists():
            raise UsageError(f"calibration data {path} does not exist (give a folder, a tensor file or 'gaussian')")
        if path.is_dir():
            from .data import image_tensors

            data = image_tensors(path, input_shape, data_config, samples)
        elif path.suffix in _TENSOR_SUFFIXES:
            data = _tensor_file(path)
            if tuple(data.shape[1:]) != per_sample:
                raise UsageError(
                    f"calibration tensor in {path} has samples of shape {tuple(data.shape[1:])}; "
                    f"the model takes {per_sample} (input shape {tuple(input_shape)})"
                )
            data = data[:samples].float()
        else:
            raise UsageError(f"calibration data {path}: expected a folder, {', '.join(_TENSOR_SUFFIXES)} or 'gaussian'")
    if data.shape[0] == 0:
        raise UsageError(f"calibration data {spec} is empty")
    if not torch.isfinite(data).all():
        raise UsageError(f"calibration data {spec} contains NaN or Inf")
    return [b.to(dtype) for b in data.split(batch_size)]


# ---------------------------------------------------------------- per-layer views
