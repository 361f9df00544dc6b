"""Top-1 / top-5 accuracy of a classifier on an image folder.

Definitions: top-k counts a sample as correct when its label is among the k highest logits. With
C < 5 output classes top-5 uses k = C, so it is 1.0 (every label is among all C predictions) — the
convention of timm's and torchvision's reference scripts. Ties are broken by ``torch.topk``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .io.records import LoadedModel
from .data import eval_loader, resolve_data_config, split_dir
from .modelrun import model_dtype
from .errors import BudgetExceeded, UsageError
from .io.files import check_writable


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """Accuracy of ``model`` over ``loader`` batches of (images (B, C, H, W), labels (B,)).

    Returns ``{"top1", "top5", "samples"}``: fractions in [0, 1] and the number of images. The
    model is put in eval mode and its previous mode restored. When a process group is initialized
    the counts are summed over ranks (each rank passes its own shard), so every rank returns the
    figures of the whole split.
    """
    was_training = model.training
    model.eval()
    dtype = model_dtype(model)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, samples
    try:
        for images, labels in loader:
            images = images.to(device, dtype=dtype, non_blocking=True)  # a half-precision model takes half images
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            try:
                logits = model(images)
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                if counts[2] > 0:  # it ran on earlier batches: not a question of the input shape
                    raise
                raise UsageError(
                    f"the model does not run on images of shape {tuple(images.shape)} "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); check --input-shape"
                ) from None
            if logits.ndim != 2:
                raise UsageError(f"the model returned shape {tuple(logits.shape)}, not (batch, classes) logits")
            if int(labels.max()) >= logits.shape[1]:
                raise UsageError(
                    f"the data has class index {int(labels.max())} but the model predicts {logits.shape[1]} classes"
                )
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=device)])
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    top1, top5, samples = counts.tolist()
    if samples == 0:
        raise UsageError("the evaluation split holds no images")
    return {"top1": top1 / samples, "top5": top5 / samples, "samples": int(samples)}


def evaluate_folder(
    loaded: LoadedModel,
    data_dir: str | Path,
    split: str = "val",
    batch_size: int = 256,
    workers: int = 4,
    device: torch.device | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Evaluate a loaded model on ``data_dir/split`` at the model's input size (see ``resolve_data_config``).

    Returns :func:`evaluate`'s dict plus ``"input_size"`` (C, H, W) and ``"split"`` (the folder).
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")
    device = device or resolve_device("auto")
    folder = split_dir(data_dir, split)
    config = resolve_data_config(loaded, input_shape)
    loader = eval_loader(folder, config, batch_size, workers, device)
    channels_last = device.type == "cuda"
    model = loaded.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate(model, loader, device, channels_last)
    return {**result, "input_size": list(config["input_size"]), "split": str(folder)}


def check_budget(result: dict[str, Any], min_top1: float | None) -> None:
    """Raise BudgetExceeded (exit 3) when top-1 is below ``min_top1``."""
    if min_top1 is not None and result["top1"] < min_top1:
        raise BudgetExceeded(f"top-1 {result['top1']:.3f} < budget {min_top1:.3f}")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cuda`` or ``cpu``."""
    if name not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device must be auto, cuda or cpu, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def validate_outputs(json_path: str | Path | None, min_top1: float | None) -> None:
    """Fail before any work on an unwritable ``--json`` path or a ``--min-top1`` outside [0, 1]."""
    if json_path is not None:
        check_writable(json_path)
    if min_top1 is not None and not 0.0 <= min_top1 <= 1.0:
        raise UsageError(f"--min-top1 is a fraction in [0, 1], got {min_top1}")
