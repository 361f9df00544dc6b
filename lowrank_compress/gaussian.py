"""Gaussian expectations of the data-free objective.

For x ~ N(0, I_d), row i of W x + b is N(b_i, ‖w_i‖²) and row i of A B x + c is N(c_i, ‖v_i‖²),
correlated by ρ_i = cos(w_i, v_i). The data-free error E ‖σ(W x + b) − σ(A B x + c)‖²_α splits
into per-row expectations of two correlated normals: closed forms for ReLU and identity (the
arc-cosine kernel), Gauss–Hermite quadrature for every other activation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from .activations import activation_fn, canonical_activation
from .factors import Factorization, check_row_weights, flatten_weight, row_blocks, row_norms

# Quadrature sizes: 1-D moments are cheap, so use many nodes; 2-D cross moments use a grid.
_GH_1D = 160
_GH_2D = 48
ROW_CHUNK = 2048


@functools.lru_cache(maxsize=8)
def _hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights for E[f(u)], u ~ N(0, 1): Σ w_k f(u_k)."""
    x, w = np.polynomial.hermite.hermgauss(n)
    return torch.from_numpy(x * math.sqrt(2.0)), torch.from_numpy(w / math.sqrt(math.pi))


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _Phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def arccos_kernel(rho: torch.Tensor) -> torch.Tensor:
    """κ(ρ) = (√(1−ρ²) + (π − arccos ρ) ρ) / (2π): E[relu(u) relu(u')] for unit normals with corr ρ."""
    rho = rho.clamp(-1.0, 1.0)
    return (torch.sqrt((1.0 - rho * rho).clamp_min(0.0)) + (math.pi - torch.acos(rho)) * rho) / (2.0 * math.pi)


def _relu_mean(mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[relu(mu + s u)] for s ≥ 0."""
    safe = s.clamp_min(1e-300)
    z = mu / safe
    out = mu * _Phi(z) + s * _phi(z)
    return torch.where(s > 0, out, mu.clamp_min(0.0))


def second_moment(activation: str, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[σ(mu + s u)²], u ~ N(0, 1), elementwise over rows."""
    act = canonical_activation(activation)
    if act == "identity":
        return mu * mu + s * s
    if act == "relu":
        safe = s.clamp_min(1e-300)
        z = mu / safe
        out = (mu * mu + s * s) * _Phi(z) + mu * s * _phi(z)
        return torch.where(s > 0, out, mu.clamp_min(0.0) ** 2)
    u, w = _hermite(_GH_1D)
    f = activation_fn(act)
    return (f(mu[:, None] + s[:, None] * u) ** 2 * w).sum(1)


def cross_moment(activation: str, a: torch.Tensor, n: torch.Tensor, c: torch.Tensor, e: torch.Tensor,
                 rho: torch.Tensor, nodes: int = _GH_2D) -> torch.Tensor:
    """E[σ(a + n u) σ(c + e(ρ u + √(1−ρ²) v))], u, v iid N(0, 1), elementwise over rows."""
    act = canonical_activation(activation)
    rho = rho.clamp(-1.0, 1.0)
    if act == "identity":
        return a * c + n * e * rho
    if act == "relu":
        if not (a.any() or c.any()):
            return n * e * arccos_kernel(rho)
        # The inner expectation over v has a closed form, which leaves a 1-D integral over u.
        comp = torch.sqrt((1.0 - rho * rho).clamp_min(0.0))
        u, w = _hermite(_GH_1D)
        inner = _relu_mean(c[:, None] + (e * rho)[:, None] * u, (e * comp)[:, None].expand(-1, u.numel()))
        return (torch.relu(a[:, None] + n[:, None] * u) * inner * w).sum(1)
    f = activation_fn(act)
    return _pair_expectation(lambda z1, z2: f(z1) * f(z2), a, n, c, e, rho, nodes, ROW_CHUNK)


def _pair_expectation(g: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, n: torch.Tensor,
                      c: torch.Tensor, e: torch.Tensor, rho: torch.Tensor, nodes: int, step: int) -> torch.Tensor:
    """Per-row E[g(a + n u, c + e(ρ u + √(1−ρ²) v))] by a 2-D Gauss–Hermite rule, ``step`` rows at a time."""
    u, w = _hermite(nodes)
    ww = w[:, None] * w[None, :]
    comp = torch.sqrt((1.0 - rho * rho).clamp_min(0.0))
    outs = []
    for lo in range(0, a.shape[0], step):
        sl = slice(lo, lo + step)
        z1 = a[sl, None, None] + n[sl, None, None] * u[None, :, None]
        z2 = c[sl, None, None] + e[sl, None, None] * (
            rho[sl, None, None] * u[None, :, None] + comp[sl, None, None] * u[None, None, :]
        )
        outs.append((g(z1, z2) * ww).sum((1, 2)))
    return torch.cat(outs) if outs else a.new_zeros(0)


def _row_stats(w: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row norms of w and v and their cosine (0 where either row is zero)."""
    n = w.norm(dim=1)
    e = v.norm(dim=1)
    denom = n * e
    rho = torch.where(denom > 0, (w * v).sum(1) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return n, e, rho.clamp(-1.0, 1.0)


def row_errors(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factorization: Factorization,
    activation: str = "relu",
) -> torch.Tensor:
    """Per-row expected squared post-activation error under x ~ N(0, I), float64, shape (m,)."""
    w = flatten_weight(weight)
    m = w.shape[0]
    A, B = factorization.A, factorization.B
    if (A.shape[0], B.shape[-1]) != tuple(w.shape):
        raise ValueError(f"factorization shape {(A.shape[0], B.shape[-1])} does not match weight {tuple(w.shape)}")
    zeros = torch.zeros(m, dtype=torch.float64)
    a = zeros if bias is None else bias.to(torch.float64)
    c = zeros if factorization.bias is None else factorization.bias.to(torch.float64)
    # Row by row, so a large layer's product A B is never formed whole.
    stats = [_row_stats(block, (A[rows] @ B).to(torch.float64)) for rows, block in row_blocks(w)]
    n, e, rho = (torch.cat(parts) for parts in zip(*stats))
    return gaussian_row_error(activation, a, n, c, e, rho)


def gaussian_row_error(activation: str, a: torch.Tensor, n: torch.Tensor, c: torch.Tensor, e: torch.Tensor,
                       rho: torch.Tensor) -> torch.Tensor:
    """Per-row E[(σ(a + n u) − σ(c + e(ρ u + √(1−ρ²) v)))²]: closed forms for identity and ReLU,
    one 2-D Gauss–Hermite rule on the squared difference otherwise."""
    act = canonical_activation(activation)
    if act not in ("identity", "relu"):
        return direct_error(act, a, n, c, e, rho)
    err = second_moment(act, a, n) + second_moment(act, c, e) - 2.0 * cross_moment(act, a, n, c, e, rho)
    return err.clamp_min(0.0)


def direct_error(activation: str, a: torch.Tensor, n: torch.Tensor, c: torch.Tensor, e: torch.Tensor,
                 rho: torch.Tensor, nodes: int = 128) -> torch.Tensor:
    """E[(σ(a + n u) − σ(c + e(ρ u + √(1−ρ²) v)))²] by one 2-D Gauss–Hermite rule.

    Integrating the squared difference directly (rather than three moments by different rules)
    makes the error exactly zero for identical rows and keeps it accurate for rows far from unit
    norm, where the moments are large and nearly cancel.
    """
    f = activation_fn(activation)
    step = max(1, ROW_CHUNK * 1024 // (nodes * nodes))
    return _pair_expectation(lambda z1, z2: (f(z1) - f(z2)) ** 2, a, n, c, e, rho, nodes, step)


def function_error(weight: torch.Tensor, bias: torch.Tensor | None, factorization: Factorization,
                   activation: str = "relu", row_weights: torch.Tensor | None = None, relative: bool = False) -> float:
    """Expected Σ_i α_i (σ(w_i·x + b_i) − σ(v_i·x + c_i))² for x ~ N(0, I).

    Closed form for ReLU without biases (the arc-cosine kernel) and identity, Gauss–Hermite
    quadrature otherwise. ``relative=True`` divides by the output energy E Σ_i α_i σ(w_i·x + b_i)²,
    the error of predicting zero.
    """
    err = row_errors(weight, bias, factorization, activation)
    alpha = check_row_weights(row_weights, err.shape[0])
    total = err.sum() if alpha is None else (alpha * err).sum()
    if relative:
        energy = output_energy(weight, bias, activation, row_weights)
        return float(total / energy) if energy > 0 else 0.0
    return float(total)


def output_energy(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "relu",
    row_weights: torch.Tensor | None = None,
) -> float:
    """E Σ_i α_i σ(w_i·x + b_i)² for x ~ N(0, I)."""
    w = flatten_weight(weight)
    a = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
    energy = second_moment(activation, a, row_norms(w))
    alpha = check_row_weights(row_weights, w.shape[0])
    return float(energy.sum() if alpha is None else (alpha * energy).sum())


def function_error_mc(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factorization: Factorization,
    activation: str = "relu",
    samples: int = 200_000,
    seed: int = 0,
    row_weights: torch.Tensor | None = None,
) -> float:
    """Monte-Carlo estimate of :func:`function_error` (for tests and sanity checks)."""
    w = flatten_weight(weight).to(torch.float64)
    m, d = w.shape
    v = factorization.product().to(torch.float64)
    b = torch.zeros(m, dtype=torch.float64) if bias is None else bias.to(torch.float64)
    c = torch.zeros(m, dtype=torch.float64) if factorization.bias is None else factorization.bias.to(torch.float64)
    alpha = check_row_weights(row_weights, m)
    f = activation_fn(activation)
    gen = torch.Generator().manual_seed(seed)
    total, done = 0.0, 0
    chunk = max(1, min(samples, 2_000_000 // max(m, d)))
    while done < samples:
        k = min(chunk, samples - done)
        x = torch.randn(k, d, generator=gen, dtype=torch.float64)
        diff = (f(x @ w.T + b) - f(x @ v.T + c)) ** 2
        total += float((diff if alpha is None else diff * alpha).sum())
        done += k
    return total / samples
