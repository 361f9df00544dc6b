"""Training losses shared by fine-tuning and the calibration-time distillation, and the early stop
on a held-out value shared by block reconstruction and distillation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")


def distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    temperature: float,
    kd_weight: float,
    label_smoothing: float,
) -> torch.Tensor:
    """(1 − w)·CE(logits, labels) + w·T²·KL(softmax(teacher/T) ‖ softmax(logits/T)), a scalar.

    ``logits``, ``teacher_logits``: (B, classes); ``labels``: (B,). Computed in float32. The T²
    factor keeps the KD gradient's scale independent of T (Hinton et al. 2015). Without a teacher
    it is the (label-smoothed) cross-entropy alone.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce
    t = temperature
    kd = F.kl_div(
        F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean", log_target=True,
    )
    return (1 - kd_weight) * ce + kd_weight * t * t * kd


def rms_adam(params: Sequence[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam with each tensor's learning rate ``lr`` × its RMS (× 1 when it is zero): steps relative to the weights."""
    return torch.optim.Adam([{"params": [p], "lr": lr * (float(p.detach().pow(2).mean().sqrt()) or 1.0)}
                             for p in params])


def split_held_out(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """(train, held out): every fourth item is held out; with fewer than four, the last one is
    held out and also trained on (there is nothing else to check against)."""
    held = [x for i, x in enumerate(items) if i % 4 == 3] or list(items[-1:])
    train = [x for i, x in enumerate(items) if i % 4 != 3] or list(items)
    return train, held


class BestIterate:
    """Early stopping on a held-out value: the best value so far and a copy of the parameters then.

    ``update(value)`` keeps an improvement, or counts one more evaluation without one and says whether
    ``patience`` of them in a row are reached. ``restore()`` puts the best parameters back (the
    starting ones when nothing beat ``start``) and clears their gradients.
    """

    def __init__(self, params: Sequence[torch.Tensor], start: float, patience: int):
        self.params, self.best, self.patience, self.stale = list(params), start, patience, 0
        self.state = [p.detach().clone() for p in self.params]

    def update(self, value: float) -> bool:
        if math.isfinite(value) and value < self.best:
            self.best, self.state, self.stale = value, [p.detach().clone() for p in self.params], 0
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self) -> None:
        with torch.no_grad():
            for p, value in zip(self.params, self.state):
                p.copy_(value)
                p.grad = None
