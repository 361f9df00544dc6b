"""Label-free distillation on the calibration inputs: the original model is the teacher.

After the per-layer and block fits, all factors are trained together to reproduce the original
model's output on the calibration inputs: the softmax KL for classifiers (the teacher's
probabilities are the only labels), and for other outputs a mean squared error standardized per
feature, so that a few outlier channels of a hidden state do not dominate the loss. Few inputs
overfit fast, so image batches are augmented (flips and mixup of pairs: the teacher labels any
input), one micro-batch in four is held out, and the iterate with the lowest held-out output
metric is kept: the result is never worse than the start on the held-out inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from .modelrun import call_model, output_tensors, padding_mask
from .sensitivity import output_metric
from .train import distillation_loss, low_rank_modules


@dataclass
class DistillReport:
    """Held-out output metric (KL or relative MSE) before and after, and the steps run."""

    metric: str
    before: float
    after: float
    steps: int


def _augment(batch: Any, gen: torch.Generator) -> Any:
    """Flips and mixup for image batches (B, C, H, W); other inputs pass unchanged."""
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or not batch.is_floating_point():
        return batch
    x = batch
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    lam = torch.distributions.Beta(0.4, 0.4).sample((x.shape[0],)).to(x.dtype).clamp(0.0, 1.0)
    lam = torch.maximum(lam, 1 - lam)[:, None, None, None]
    partner = torch.randperm(x.shape[0], generator=gen)
    return lam * x + (1 - lam) * x[partner]


def _loss(student: list[torch.Tensor], teacher: list[torch.Tensor], metric: str, scales: list[torch.Tensor],
          mask: torch.Tensor | None) -> torch.Tensor:
    if metric == "kl":
        labels = teacher[0].argmax(-1)
        return distillation_loss(student[0], labels, teacher[0], temperature=1.0, kd_weight=1.0, label_smoothing=0.0)
    total = torch.zeros(())
    for s, t, scale in zip(student, teacher, scales):
        diff = ((s.float() - t.float()) / scale) ** 2
        if mask is not None and diff.dim() >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
            weights = mask.to(diff.dtype).reshape(*mask.shape, *([1] * (diff.dim() - 2)))
            total = total + (diff * weights).sum() / (weights.sum() * diff[0, 0].numel()).clamp_min(1.0)
        else:
            total = total + diff.mean()
    return total


def _feature_scales(outputs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-feature (last axis) standard deviation of each teacher output over the calibration set."""
    scales = []
    for i in range(len(outputs[0])):
        rows = torch.cat([o[i].detach().float().reshape(-1, o[i].shape[-1]) for o in outputs])
        scales.append(rows.std(0).clamp_min(float(rows.std()) * 1e-3 + 1e-12))
    return scales


def distill(model: nn.Module, teacher: nn.Module, batches: Sequence[Any], metric: str, steps: int,
            lr: float = 3e-2, seed: int = 0, eval_every: int = 25, patience: int = 8) -> DistillReport:
    """Train the factors of ``model`` in place against ``teacher`` on ``batches`` (see the module docstring)."""
    held = [b for i, b in enumerate(batches) if i % 4 == 3] or list(batches[-1:])
    train = [b for i, b in enumerate(batches) if i % 4 != 3] or list(batches)
    with torch.no_grad():
        held_ref = [output_tensors(call_model(teacher, b)) for b in held]
    scales = _feature_scales(held_ref) if metric == "mse" else []

    def held_metric() -> float:
        num, den = 0.0, 0.0
        with torch.no_grad():
            for batch, ref in zip(held, held_ref):
                n, d = output_metric(ref, output_tensors(call_model(model, batch)), metric, padding_mask(batch))
                num, den = num + n, den + d
        return num / den if den > 0 else 0.0

    start = held_metric()
    params = [p for m in low_rank_modules(model) for p in m.parameters() if p.is_floating_point()]
    if not params or steps <= 0 or not math.isfinite(start):
        return DistillReport(metric, start, start, 0)
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": [p], "lr": lr * (float(p.detach().pow(2).mean().sqrt()) or 1.0)}
                            for p in params])
    schedule = CosineLRScheduler(opt, t_initial=steps, warmup_t=min(10, steps // 10), warmup_lr_init=0.0, lr_min=0.0)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, stale, done = start, [p.detach().clone() for p in params], 0, 0
    was_training = model.training
    model.eval()  # BatchNorm statistics and dropout stay as in the original
    try:
        for step in range(steps):
            batch = _augment(train[int(torch.randint(len(train), (1,), generator=gen))], gen)
            with torch.no_grad():
                target = output_tensors(call_model(teacher, batch))
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = _loss(output_tensors(call_model(model, batch)), target, metric, scales, padding_mask(batch))
                if not torch.isfinite(loss):
                    break
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            done = step + 1
            schedule.step(done)
            if done % eval_every == 0 or done == steps:
                value = held_metric()
                if math.isfinite(value) and value < best:
                    best, best_state, stale = value, [p.detach().clone() for p in params], 0
                else:
                    stale += 1
                    if stale >= patience:
                        break
    finally:
        with torch.no_grad():
            for p, value in zip(params, best_state):
                p.copy_(value)
                p.grad = None
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return DistillReport(metric, start, best, done)

