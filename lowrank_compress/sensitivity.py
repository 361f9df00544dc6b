"""How much a perturbation inside the model moves the model's output (output-aware compression).

For a tensor t inside the model (a layer's output, a block's output) and a small perturbation Δ of
it, the output metric moves by about

    kl:  E_x KL(p(x) ‖ p̃(x)) ≈ ½ E_x[Δᵀ F_x Δ],   F_x = E_{ŷ~p(x)}[g gᵀ],  g = ∂ log p(ŷ|x) / ∂t
    mse: E‖f̃(x) − f(x)‖² / E‖f(x)‖² ≈ E_x[Δᵀ Jᵀ J Δ] / E‖f(x)‖²,  with Jᵀ J = E_v[g gᵀ],  g = Jᵀ v, v ~ N(0, I)

(the Fisher information of the softmax and the Gauss–Newton matrix; both are estimated from the
gradients g of one backward pass per calibration batch). Keeping only the diagonal and treating g
and Δ as independent, each channel c of t gets a weight

    s_c = κ · E_x Σ_positions g_c²        (κ = ½ for kl, 1 / E‖f‖² for mse)

and a perturbation with per-position channel variance v_c costs ≈ Σ_c s_c v_c of the output metric.
These are the per-row weights of the calibrated projection and the block losses, and their sums
over a layer's residual variances are the rank-allocation curves. ``benchmarks/sensitivity.py``
compares the estimate with the directly measured metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .modelrun import batch_size, call_model, output_tensors, padding_mask

OUTPUT_METRICS = ("auto", "kl", "mse")


def detect_output_metric(model: nn.Module, example: Any) -> str:
    """``kl`` when the model returns a (batch, classes) tensor straight from a Linear layer, else ``mse``.

    A classifier's logits are the output of its last Linear layer; an embedding model's vectors
    come out of pooling or normalization, and a backbone's features have more dimensions.
    """
    produced_by_linear: list[torch.Tensor] = []

    def record(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            produced_by_linear.append(output)

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            out = call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
        return "mse"
    return "kl" if any(t is out for t in produced_by_linear) else "mse"


def output_metric(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], metric: str,
                  mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(sum of the metric's numerator, its normalizer) of one batch; the metric is their ratio.

    kl: Σ_x KL(softmax(reference) ‖ softmax(outputs)) over the batch, normalized by the batch size.
    mse: Σ ‖outputs − reference‖², normalized by Σ ‖reference‖² (padded tokens excluded by ``mask``).
    """
    if metric == "kl":
        ref, new = reference[0].double(), outputs[0].double()
        kl = F.kl_div(F.log_softmax(new, -1), F.log_softmax(ref, -1), log_target=True, reduction="sum")
        return float(kl), float(ref.shape[0])
    num, den = 0.0, 0.0
    for ref, new in zip(reference, outputs):
        diff, energy = (new.double() - ref.double()) ** 2, ref.double() ** 2
        weights = _token_weights(mask, ref)
        if weights is not None:
            diff, energy = diff * weights, energy * weights
        num, den = num + float(diff.sum()), den + float(energy.sum())
    return num, den


def _token_weights(mask: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor | None:
    """The (batch, tokens) mask broadcast over ``tensor`` (batch, tokens, ...), when shapes agree."""
    if mask is None or tensor.dim() < 2 or tuple(tensor.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(tensor.dtype).reshape(*mask.shape, *([1] * (tensor.dim() - 2)))


def _channel_sum(grad: torch.Tensor, channels_last: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ over batch and positions of g², per channel (channel axis 1, or last for Linear)."""
    g2 = grad.detach().float().square()  # float32 squares, float64 sums: no float64 copy of a large map
    weights = _token_weights(mask, g2)
    if weights is not None:
        g2 = g2 * weights.float()
    if channels_last:
        return g2.reshape(-1, g2.shape[-1]).sum(0, dtype=torch.float64)
    return g2.sum([d for d in range(g2.dim()) if d != 1], dtype=torch.float64)


Visitor = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


def probe_gradients(model: nn.Module, targets: dict[str, nn.Module], batches: Sequence[Any], metric: str,
                    visit: Visitor, seed: int = 0, draws: int = 2) -> float:
    """Backward the metric's probe (see the module docstring) through ``model``, ``draws`` times per batch.

    ``visit(name, output, grad, mask)`` sees each target module's (first-call) output and the
    probe's gradient there (same shape), and the batch's padding mask. Returns κ / (draws · N):
    the factor that turns Σ over visits of (g·Δ)² into the predicted metric. The model's parameters
    are not touched: gradients flow only to the hooked outputs.
    """
    gen = torch.Generator().manual_seed(seed + 11)
    samples, energy = 0, 0.0
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for batch in batches:
            mask = padding_mask(batch)
            for _ in range(draws):
                captured: dict[str, torch.Tensor] = {}
                handles = [m.register_forward_hook(_capture(name, captured)) for name, m in targets.items()]
                try:
                    with torch.enable_grad():
                        outputs = output_tensors(call_model(model, batch))
                        loss, batch_energy = _probe_loss(outputs, metric, gen, mask)
                        live = [t for t in captured.values() if t.requires_grad]
                        grads = torch.autograd.grad(loss, live, allow_unused=True) if live else []
                finally:
                    for h in handles:
                        h.remove()
                by_id = {id(t): g for t, g in zip(live, grads)}
                for name, tensor in captured.items():
                    grad = by_id.get(id(tensor))
                    visit(name, tensor.detach(), torch.zeros_like(tensor) if grad is None else grad.detach(), mask)
            samples += batch_size(batch)
            energy += batch_energy
    finally:
        for p in frozen:
            p.requires_grad_(True)
    kappa = 0.5 if metric == "kl" else samples / max(energy, 1e-300)
    return kappa / (draws * max(samples, 1))


def channel_sensitivities(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: Sequence[Any],
    metric: str,
    channels_last: Callable[[str], bool],
    seed: int = 0,
    draws: int = 2,
    slopes: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Per target module, s_c for each channel of its (first-call) output, float64, ≥ 0.

    ``channels_last(name)`` says whether that module's channels are on the last axis (Linear) or
    axis 1 (convolutions, blocks). ``slopes[name](output)``, where given, is the elementwise
    derivative of what the sensitivity should refer to (e.g. the post-activation value) with
    respect to the hooked output; s_c is then divided by the channel's mean squared slope.
    """
    slopes = slopes or {}
    totals: dict[str, torch.Tensor] = {}
    slope_sums: dict[str, torch.Tensor] = {}
    rows: dict[str, float] = {}

    def visit(name: str, tensor: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None) -> None:
        last = channels_last(name)
        totals[name] = _channel_sum(grad, last, mask) + totals.get(name, 0.0)
        rows[name] = rows.get(name, 0.0) + _positions(tensor, last, mask)
        if name in slopes:
            slope = _channel_sum(slopes[name](tensor), last, mask)
            count = torch.full_like(slope, _positions(tensor, last, mask))
            slope_sums[name] = torch.stack([slope, count]) + slope_sums.get(name, 0.0)

    factor = probe_gradients(model, targets, batches, metric, visit, seed=seed, draws=draws)
    out = {name: total * factor for name, total in totals.items()}
    for name, (slope, count) in slope_sums.items():
        mean = slope / count.clamp_min(1.0)  # E[slope²] per position
        out[name] = out[name] / mean.clamp_min(float(mean.max()) * 1e-3 + 1e-300)
    for name, value in out.items():
        # Few probe rows for many channels (a classifier probed on 64 images) see only the classes
        # those images show: every other logit would get no weight and be dropped by the fit.
        # Shrink toward the channels' mean by λ = m / (m + rows), as the response statistics are.
        m = value.shape[0]
        shrink = m / (m + max(rows.get(name, 0.0) / max(draws, 1), 1.0))
        out[name] = (1 - shrink) * value + shrink * value.mean()
    return out


def _positions(tensor: torch.Tensor, channels_last: bool, mask: torch.Tensor | None) -> float:
    """How many (sample, position) rows a hooked tensor has, padded tokens excluded."""
    weights = _token_weights(mask, tensor)
    channels = tensor.shape[-1] if channels_last else tensor.shape[1]
    if weights is None:
        return tensor.numel() / channels
    return float(weights.expand_as(tensor).sum()) / channels


def _capture(name: str, captured: dict[str, torch.Tensor]):
    """A forward hook that keeps the module's (first) output tensor, made part of the autograd graph."""

    def hook(_module, _inputs, output):
        tensor = output if isinstance(output, torch.Tensor) else (
            output[0] if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) else None)
        if name in captured or tensor is None or not tensor.is_floating_point():
            return None
        if tensor.requires_grad:
            captured[name] = tensor
            return None
        # Upstream of the first hooked tensor nothing needs a gradient: start the graph here.
        tensor = tensor.detach().requires_grad_(True)
        captured[name] = tensor
        return tensor if isinstance(output, torch.Tensor) else (tensor, *output[1:])

    return hook


def _probe_loss(outputs: list[torch.Tensor], metric: str, gen: torch.Generator,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """A scalar whose gradient is g (see the module docstring), and Σ‖f(x)‖² of the batch."""
    if metric == "kl":
        logits = outputs[0]
        with torch.no_grad():
            drawn = torch.multinomial(F.softmax(logits.detach().double(), -1).float(), 1, generator=gen).squeeze(1)
        return F.log_softmax(logits, -1).gather(1, drawn[:, None]).sum(), 0.0
    loss, energy = 0.0, 0.0
    for out in outputs:
        if not out.is_floating_point():
            continue
        probe = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        weights = _token_weights(mask, out)
        if weights is not None:
            probe = probe * weights
            energy += float((out.detach().double() ** 2 * weights.double()).sum())
        else:
            energy += float(out.detach().double().pow(2).sum())
        loss = loss + (out * probe).sum()
    return loss, energy

