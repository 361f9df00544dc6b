"""Output costs of a layer's factorization: what dropping response directions does to the model's output.

Built on the gradient probes of :mod:`lowrank_compress.sensitivity`: per-channel sensitivities of
each layer's post-activation output (the row weights of the calibrated fit) and, per layer, the
predicted output-metric cost at every rank (the curves of the output-aware rank allocation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .activations import activation_fn
from .graph import LayerSite
from .responses import ResponseStats, responses
from .sensitivity import channel_sensitivities, probe_gradients


def site_sensitivities(original: nn.Module, sites: list[LayerSite], batches: list[Any], metric: str,
                       seed: int) -> dict[str, torch.Tensor]:
    """Per site, output sensitivity of each output channel's post-activation value (float64, (m,)).

    Gradients are taken at the layer's own output z and mapped to the post-activation value
    σ(scale·z + shift) of the BN-folded response (see :mod:`lowrank_compress.sensitivity`).
    """
    targets = {s.name: original.get_submodule(s.name) for s in sites}
    linear = {s.name for s in sites if isinstance(s.module, nn.Linear)}
    slopes = {s.name: _slope(s) for s in sites}
    return channel_sensitivities(original, targets, batches, metric, lambda n: n in linear, seed=seed, draws=2,
                                 slopes=slopes)


def _slope(site: LayerSite) -> Callable[[torch.Tensor], torch.Tensor]:
    """z ↦ ∂σ(scale·z + shift)/∂z elementwise, channels on the layer's channel axis."""
    fn = activation_fn(site.activation)
    linear = isinstance(site.module, nn.Linear)

    def slope(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().to(torch.float32)
        if site.bn_before is not None:
            shape = [1] * z.dim()
            shape[-1 if linear else 1] = -1
            scale = site.bn_before.scale.to(torch.float32).reshape(shape)
            shift = site.bn_before.shift.to(torch.float32).reshape(shape)
        else:
            scale, shift = torch.ones(()), torch.zeros(())
        with torch.enable_grad():
            x = z.requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(x * scale + shift).sum(), x)
        return grad

    return slope


def output_cost_curves(original: nn.Module, sites: list[LayerSite], batches: list[Any], metric: str,
                       stats: dict[str, ResponseStats], alphas: dict[str, torch.Tensor | None],
                       seed: int) -> dict[str, torch.Tensor]:
    """Per site, the predicted output-metric cost of keeping only r response directions, r = 0..m.

    The site's BN-folded response z (rows, m) is projected, like the calibrated fit, onto the top
    eigenvectors U of S̃ = √α Σ √α; dropping directions j ≥ r changes z by Δ = −Σ_{j≥r} c_j u_j/√α
    with c = √α (z − μ) U. To first order the metric moves by κ E_x[(Σ_positions g·Δ)²], with g the
    probe gradient (:mod:`lowrank_compress.sensitivity`), so with h = (g/√α) U and
    t_j(x) = Σ_positions c_j h_j, the cost at rank r is κ E_x[(Σ_{j≥r} t_j(x))²]. Unlike a per-channel
    estimate this keeps the correlation of errors across positions (a layer before global pooling).
    Returns a (m + 1,) float64 tensor per site, index r.

    With few response rows for many outputs (a classifier calibrated on 64 images) the sample
    c_j describe only the calibration inputs, and the curve would price a rank that keeps their
    classes as cheap. Like the statistics (:meth:`ResponseStats.shrunk_covariance`), the curve is
    then blended, with the same λ = m / (m + n), toward its value under the shrunk covariance with
    c independent of h: κ Σ_{j≥r} λ̃_j Σ_{x, positions} h_j², λ̃ the eigenvalues of √α Σ̃ √α.
    """
    bases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    spectra: dict[str, tuple[torch.Tensor, float]] = {}
    for site in sites:
        st = stats[site.name]
        m = st.mean.shape[0]
        a = alphas.get(site.name)
        a = torch.ones(m, dtype=torch.float64) if a is None else a.clamp_min(float(a.max()) * 1e-8 + 1e-30)
        root = a.sqrt()
        cov = st.shrunk_covariance(site.effective_weight()[0])
        evals, evecs = torch.linalg.eigh(root[:, None] * cov * root[None, :])
        order = torch.argsort(evals, descending=True)
        u = evecs[:, order]
        bases[site.name] = (st.mean.to(torch.float32), root.to(torch.float32), u.to(torch.float32))
        spectra[site.name] = (evals[order].clamp_min(0.0), m / (m + max(st.count, 1)))
    by_name = {s.name: s for s in sites}
    totals = {s.name: torch.zeros(s.shape[0] + 1, dtype=torch.float64) for s in sites}
    energies = {s.name: torch.zeros(s.shape[0], dtype=torch.float64) for s in sites}  # Σ h_j²

    def visit(name: str, z: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None) -> None:
        site = by_name[name]
        mu, root, u = bases[name]
        n = z.shape[0]
        rows = responses(site, z.to(torch.float32))
        grad = _rows(site, g.to(torch.float32))
        if site.bn_before is not None:
            scale = site.bn_before.scale.to(torch.float32)
            grad = grad / torch.where(scale.abs() > 1e-12, scale, torch.full_like(scale, float("inf")))
        if mask is not None and isinstance(site.module, nn.Linear) and tuple(z.shape[:2]) == tuple(mask.shape):
            grad = grad * mask.reshape(*mask.shape, *([1] * (z.dim() - 3))).expand(*z.shape[:-1]).reshape(-1, 1)
        c = ((rows - mu) * root) @ u
        h = (grad / root) @ u
        t = (c * h).reshape(n, -1, c.shape[1]).sum(1).to(torch.float64)  # (N, m)
        tail = torch.cat([t.flip(1).cumsum(1).flip(1), torch.zeros(n, 1, dtype=torch.float64)], dim=1)
        totals[name] += (tail**2).sum(0)
        energies[name] += h.pow(2).sum(0, dtype=torch.float64)

    targets = {s.name: original.get_submodule(s.name) for s in sites}
    factor = probe_gradients(original, targets, batches, metric, visit, seed=seed)
    out = {}
    for name, total in totals.items():
        lam_j, shrink = spectra[name]
        if shrink >= 1e-3:
            terms = lam_j * energies[name]
            prior = torch.cat([terms.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
            total = (1 - shrink) * total + shrink * prior
        out[name] = total * factor
    return out


def _rows(site: LayerSite, t: torch.Tensor) -> torch.Tensor:
    """A layer output (N, m, ...) or (..., m) as rows (positions, m), without the BN fold."""
    if isinstance(site.module, nn.Linear):
        return t.reshape(-1, t.shape[-1])
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def row_weights(site: LayerSite, sensitivity: torch.Tensor | None) -> torch.Tensor | None:
    """Row weights of a site's fit: its output sensitivities, normalized to mean 1, floored."""
    if sensitivity is None:
        return site.row_weights()
    a = sensitivity.to(torch.float64)
    mean = float(a.mean())
    if not math.isfinite(mean) or mean <= 0:
        return site.row_weights()
    return (a / mean).clamp_min(1e-3)
