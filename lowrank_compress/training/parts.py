"""The training loop's parts: regularizers, parameter groups, timm's LR schedule and EMA, logging and progress."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..layers import low_rank_modules


def frobenius_penalty(modules: list[nn.Module]) -> torch.Tensor:
    """Σ over factorized modules of ‖A B‖²_F, A = up weight (m, r), B = down weight flattened (r, d).

    Computed as Σ (AᵀA) ∘ (B Bᵀ) = tr(AᵀA B Bᵀ): r×r products instead of the m×d matrix. Float32.
    """
    total = torch.zeros((), device=modules[0].up.weight.device)
    for module in modules:
        a = module.up.weight.float().reshape(module.up.weight.shape[0], -1)
        b = module.down.weight.float().reshape(a.shape[1], -1)
        total = total + ((a.T @ a) * (b @ b.T)).sum()
    return total


def parameter_groups(model: nn.Module, weight_decay: float, frobenius_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: weights with decay; biases and norm parameters (1-D) without; factor weights
    without plain decay when Frobenius decay regularizes their product instead (Khodak et al. 2021)."""
    factors = {id(p) for m in low_rank_modules(model) for p in (m.up.weight, m.down.weight)}
    decay, no_decay, factor = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in factors:
            factor.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": factor, "weight_decay": 0.0 if frobenius_decay > 0 else weight_decay},
    ]
    return [g for g in groups if g["params"]]


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """timm's ``CosineLRScheduler`` over optimizer steps, already set for the first step.

    Step ``s`` (0-based) runs at the schedule's ``t = s + 1``: a linear warm-up that reaches the peak LR
    at step ``warmup_steps − 1``, then a cosine over the remaining steps down to zero one step after
    the last. Call ``step_update(s + 2)`` after step ``s``. The LR depends on the step alone, so a
    resumed run sets it again from its step count.
    """
    from timm.scheduler import CosineLRScheduler

    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(1, total_steps - warmup_steps + 1), warmup_t=warmup_steps, warmup_lr_init=0.0,
        warmup_prefix=True, lr_min=0.0, t_in_epochs=False,
    )
    scheduler.step_update(1)
    return scheduler


def model_ema(model: nn.Module, decay: float) -> nn.Module:
    """timm's ``ModelEmaV3`` of ``model``: after each step ema ← decay·ema + (1 − decay)·param, buffers
    (BatchNorm statistics) copied. The copy lives on the model's device, in eval mode, without gradients."""
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=decay, exclude_buffers=True)
    ema.module.requires_grad_(False)
    return ema


class RunLog:
    """JSON-lines log (rank 0 only), appended to so a resumed run continues the same file.

    One object per line, each with ``time`` (Unix seconds) and ``event``: ``start`` (world_size,
    device, config, steps_per_epoch, total_steps), ``resume`` (step, epoch, step_in_epoch), ``step``
    (step, epoch, loss = mean over ranks and steps since the last record, lr, images_per_s),
    ``epoch`` (epoch, step, train_loss, val_top1/val_top5/val_samples when a val split exists) and
    ``end`` (step, output, stopped_at_max_steps). Epochs count from 1, steps are optimizer steps.
    """

    def __init__(self, path: str | Path | None, enabled: bool) -> None:
        self.file = open(path, "a") if (path is not None and enabled) else None

    def write(self, **record: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Notes:
    """One-line messages to stderr from rank 0."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True) if enabled else None

    def __call__(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False, markup=False)


def progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def num_outputs(model: nn.Module, input_size: tuple[int, ...], device: torch.device) -> int:
    """The number of logits the model returns for one input of ``input_size`` (C, H, W)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    if out.ndim != 2:
        raise UsageError(f"the model returned shape {tuple(out.shape)}, not (batch, classes) logits")
    return out.shape[1]
