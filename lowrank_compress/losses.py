"""Training losses shared by fine-tuning and the calibration-time distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
