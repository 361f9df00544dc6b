"""Nonlinear kernel projection and spectral factorization: the math.

Tensors in, tensors out. Everything is computed in float64 and returned in the dtype of the weight.
A weight W has shape (m, d) (conv weights (m, C/groups, k...) are flattened to m × (C/groups·k...));
a factorization is W ≈ A B with A: (m, r), B: (r, d) and an output bias of shape (m,).

The data-free objective (docs/design.md §2): for x ~ N(0, I_d) minimize
    E ‖σ(W x + b) − σ(A B x + c)‖²_α      (α: optional per-row weights)
over rank-r A B and c. Row i of W x + b is N(b_i, ‖w_i‖²), so the error splits into per-row Gaussian
expectations of two correlated normals, with the correlation ρ_i = cos(w_i, v_i).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .activations import activation_fn, canonical_activation

METHODS = ("nkp", "spectral")

# Quadrature sizes: 1-D moments are cheap, so use many nodes; 2-D cross moments use a grid.
_GH_1D = 160
_GH_2D = 48
_GH_2D_FIT = 24  # the per-row fit uses a coarser grid; the result is checked on the fine one
_ROW_CHUNK = 2048
# A weight with at least this many elements is never copied whole to float64 (a 16384² layer would
# take 2 GiB more): the randomized SVD reads it in float32 and row-wise float64 quantities are
# computed over blocks of at least _BLOCK_ELEMENTS. At 32 MiB and up, glibc gives each block its own
# mapping and returns it on free; smaller blocks come from the heap, which then grows with
# fragmentation (a 16384² layer peaked at 4.1 GB with 16 MiB blocks and 2.8 GB with 32 MiB ones).
LARGE_WEIGHT = 50_000_000
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Factorization:
    """W ≈ A @ B (+ bias): A (m, r), B (r, d), bias (m,) or None."""

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def product(self) -> torch.Tensor:
        """The dense (m, d) matrix A @ B."""
        return self.A @ self.B

    def to(self, dtype: torch.dtype) -> Factorization:
        bias = None if self.bias is None else self.bias.to(dtype)
        return Factorization(self.A.to(dtype), self.B.to(dtype), bias)


# ---------------------------------------------------------------- validation


def flatten_weight(weight: torch.Tensor) -> torch.Tensor:
    """(m, ...) → (m, d): a conv weight (m, C/g, k...) becomes m × (C/g·k...)."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a tensor, got {type(weight).__name__}")
    if weight.ndim < 2:
        raise ValueError(f"weight must be at least 2-D (m, d, ...), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:  # checked first: reshape(0, -1) itself fails
        raise ValueError(f"weight has an empty dimension: shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def _check_finite(name: str, t: torch.Tensor | None) -> None:
    # In chunks: isfinite on a whole 16384² weight allocates 1.75 GiB of temporaries.
    if t is not None and not all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(_BLOCK_ELEMENTS)):
        raise ValueError(f"{name} contains NaN or Inf values")


def _check_rank(rank: int, m: int, d: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"rank must be an integer, got {rank!r}")
    if rank < 1 or rank > min(m, d):
        raise ValueError(f"rank {rank} is outside [1, {min(m, d)}] for a {m}×{d} weight")
    return int(rank)


def _check_bias(bias: torch.Tensor | None, m: int) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.shape != (m,):
        raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
    _check_finite("bias", bias)
    return bias.to(torch.float64)


def _check_row_weights(row_weights: torch.Tensor | None, m: int) -> torch.Tensor | None:
    if row_weights is None:
        return None
    if row_weights.shape != (m,):
        raise ValueError(f"row_weights must have shape ({m},), got {tuple(row_weights.shape)}")
    if not torch.isfinite(row_weights).all() or (row_weights < 0).any():
        raise ValueError("row_weights must be finite and non-negative")
    return row_weights.to(torch.float64)


# ---------------------------------------------------------------- Gaussian expectations


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


def cross_moment(
    activation: str,
    a: torch.Tensor,
    n: torch.Tensor,
    c: torch.Tensor,
    e: torch.Tensor,
    rho: torch.Tensor,
    nodes: int = _GH_2D,
) -> torch.Tensor:
    """E[σ(a + n u) σ(c + e(ρ u + √(1−ρ²) v))], u, v iid N(0, 1), elementwise over rows."""
    act = canonical_activation(activation)
    rho = rho.clamp(-1.0, 1.0)
    if act == "identity":
        return a * c + n * e * rho
    f = activation_fn(act)
    comp = torch.sqrt((1.0 - rho * rho).clamp_min(0.0))
    if act == "relu":
        if not (a.any() or c.any()):
            return n * e * arccos_kernel(rho)
        # The inner expectation over v has a closed form, which leaves a 1-D integral over u.
        u, w = _hermite(_GH_1D)
        inner = _relu_mean(c[:, None] + (e * rho)[:, None] * u, (e * comp)[:, None].expand(-1, u.numel()))
        return (torch.relu(a[:, None] + n[:, None] * u) * inner * w).sum(1)
    u, w = _hermite(nodes)
    ww = w[:, None] * w[None, :]
    outs = []
    for lo in range(0, a.shape[0], _ROW_CHUNK):
        sl = slice(lo, lo + _ROW_CHUNK)
        z1 = a[sl, None, None] + n[sl, None, None] * u[None, :, None]
        z2 = c[sl, None, None] + e[sl, None, None] * (
            rho[sl, None, None] * u[None, :, None] + comp[sl, None, None] * u[None, None, :]
        )
        outs.append((f(z1) * f(z2) * ww).sum((1, 2)))
    return torch.cat(outs) if outs else a.new_zeros(0)


def _row_blocks(w: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, those rows of w (m, d) in float64): one block unless w has LARGE_WEIGHT elements."""
    m, d = w.shape
    step = m if w.numel() < LARGE_WEIGHT else -(-_BLOCK_ELEMENTS // max(d, 1))
    for start in range(0, m, step):
        rows = slice(start, min(start + step, m))
        yield rows, w[rows].to(torch.float64)


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    """Row norms of w (m, d), float64, (m,)."""
    return torch.cat([block.norm(dim=1) for _, block in _row_blocks(w)])


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
    stats = [_row_stats(block, (A[rows] @ B).to(torch.float64)) for rows, block in _row_blocks(w)]
    n, e, rho = (torch.cat(parts) for parts in zip(*stats))
    return gaussian_row_error(activation, a, n, c, e, rho)


def gaussian_row_error(
    activation: str,
    a: torch.Tensor,
    n: torch.Tensor,
    c: torch.Tensor,
    e: torch.Tensor,
    rho: torch.Tensor,
) -> torch.Tensor:
    """Per-row E[(σ(a + n u) − σ(c + e(ρ u + √(1−ρ²) v)))²]: closed forms for identity and ReLU,
    one 2-D Gauss–Hermite rule on the squared difference otherwise."""
    act = canonical_activation(activation)
    if act not in ("identity", "relu"):
        return direct_error(act, a, n, c, e, rho)
    err = second_moment(act, a, n) + second_moment(act, c, e) - 2.0 * cross_moment(act, a, n, c, e, rho)
    return err.clamp_min(0.0)


def direct_error(
    activation: str,
    a: torch.Tensor,
    n: torch.Tensor,
    c: torch.Tensor,
    e: torch.Tensor,
    rho: torch.Tensor,
    nodes: int = 128,
) -> torch.Tensor:
    """E[(σ(a + n u) − σ(c + e(ρ u + √(1−ρ²) v)))²] by one 2-D Gauss–Hermite rule.

    Integrating the squared difference directly (rather than three moments by different rules)
    makes the error exactly zero for identical rows and keeps it accurate for rows far from unit
    norm, where the moments are large and nearly cancel.
    """
    f = activation_fn(activation)
    u, w = _hermite(nodes)
    ww = w[:, None] * w[None, :]
    comp = torch.sqrt((1.0 - rho * rho).clamp_min(0.0))
    outs = []
    step = max(1, _ROW_CHUNK * 1024 // (nodes * nodes))
    for lo in range(0, a.shape[0], step):
        sl = slice(lo, lo + step)
        z1 = a[sl, None, None] + n[sl, None, None] * u[None, :, None]
        z2 = c[sl, None, None] + e[sl, None, None] * (
            rho[sl, None, None] * u[None, :, None] + comp[sl, None, None] * u[None, None, :]
        )
        outs.append(((f(z1) - f(z2)) ** 2 * ww).sum((1, 2)))
    return torch.cat(outs) if outs else a.new_zeros(0)


def function_error(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factorization: Factorization,
    activation: str = "relu",
    row_weights: torch.Tensor | None = None,
    relative: bool = False,
) -> float:
    """Expected Σ_i α_i (σ(w_i·x + b_i) − σ(v_i·x + c_i))² for x ~ N(0, I).

    Closed form for ReLU without biases (the arc-cosine kernel) and identity, Gauss–Hermite
    quadrature otherwise. ``relative=True`` divides by the output energy E Σ_i α_i σ(w_i·x + b_i)²,
    the error of predicting zero.
    """
    err = row_errors(weight, bias, factorization, activation)
    alpha = _check_row_weights(row_weights, err.shape[0])
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
    energy = second_moment(activation, a, _row_norms(w))
    alpha = _check_row_weights(row_weights, w.shape[0])
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
    alpha = _check_row_weights(row_weights, m)
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


# ---------------------------------------------------------------- factorizations


def _subspace(
    w: torch.Tensor, rank: int, alpha: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-r row subspace of diag(√α) W, as coordinates and basis.

    Returns C = W V_r (m, r), V_rᵀ (r, d) with orthonormal rows, and the singular values s (r,),
    so that the rows of W projected on the subspace are C V_rᵀ. Directions with a numerically
    zero singular value (singular or rank-deficient W) get zero coordinates and a zero basis row.

    The eigendecomposition of the smaller Gram matrix is much faster than a full SVD on CPU and,
    in float64, accurate for the top directions; small ranks of very large matrices use a
    randomized SVD with power iterations instead.
    """
    m, d = w.shape
    target = w if alpha is None else alpha.sqrt().to(w.dtype)[:, None] * w
    if rank <= min(m, d) // 8 and m * d >= 4_000_000:
        # float32 keeps very large layers (e.g. 16384²) within memory.
        work = target.to(torch.float32) if m * d >= LARGE_WEIGHT else target
        _, s, v = torch.svd_lowrank(work, q=min(rank + 16, min(m, d)), niter=6)
        s, vt = s[:rank].to(torch.float64), v[:, :rank].T.to(torch.float64)
        coords = torch.cat([block @ vt.T for _, block in _row_blocks(w)])
        return coords, vt, s
    w, target = w.to(torch.float64), target.to(torch.float64)
    if m <= d:
        evals, evecs = torch.linalg.eigh(target @ target.T)
        order = torch.argsort(evals, descending=True)[:rank]
        s = evals[order].clamp_min(0.0).sqrt()
        u = evecs[:, order]
        keep = s > s.max().clamp_min(1e-300) * 1e-10
        vt = torch.where(keep[:, None], (u.T @ target) / s.clamp_min(1e-300)[:, None], torch.zeros(()).to(w))
    else:
        evals, evecs = torch.linalg.eigh(target.T @ target)
        order = torch.argsort(evals, descending=True)[:rank]
        s = evals[order].clamp_min(0.0).sqrt()
        vt = evecs[:, order].T
    coords = w @ vt.T
    return coords, vt, s


def spectral_factors(
    weight: torch.Tensor,
    rank: int,
    bias: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> Factorization:
    """Rank-r SVD truncation split as A = U√S, B = √S Vᵀ (Khodak et al. 2021).

    With ``row_weights`` α the subspace is that of diag(√α) W, the best α-weighted truncation.
    """
    return factorize(weight, rank, method="spectral", activation="identity", bias=bias, row_weights=row_weights)


def kernel_projection(
    weight: torch.Tensor,
    rank: int,
    activation: str = "relu",
    bias: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> Factorization:
    """Data-free nonlinear kernel projection: SVD subspace, then per-row (scale, bias) fit."""
    return factorize(weight, rank, method="nkp", activation=activation, bias=bias, row_weights=row_weights)


def factorize(
    weight: torch.Tensor,
    rank: int,
    method: str = "nkp",
    activation: str = "relu",
    bias: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> Factorization:
    """Factor ``weight`` (m, d, ...) into A (m, r) @ B (r, d) preserving σ(W x + b).

    ``spectral`` truncates the SVD. ``nkp`` keeps the SVD subspace and gives each row the length
    (and, when the layer has a bias, the bias) that minimizes its expected post-activation error
    under x ~ N(0, I): for ReLU without bias the row norm becomes ‖w_i‖·2κ(ρ_i).
    Results come back in the weight's dtype.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return factorize_all(weight, rank, activation, bias, row_weights, methods=(method,))[method]


def factorize_all(
    weight: torch.Tensor,
    rank: int,
    activation: str = "relu",
    bias: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    methods: tuple[str, ...] = METHODS,
) -> dict[str, Factorization]:
    """:func:`factorize` for several methods, sharing one subspace computation."""
    w = flatten_weight(weight)
    m, d = w.shape
    rank = _check_rank(rank, m, d)
    unknown = [mt for mt in methods if mt not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    act = canonical_activation(activation)
    _check_finite("weight", w)
    b = _check_bias(bias, m)
    alpha = _check_row_weights(row_weights, m)
    if w.numel() < LARGE_WEIGHT:
        w = w.to(torch.float64)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32

    coords, basis, s = _subspace(w, rank, alpha)
    split = s.sqrt().clamp_min(1e-150)
    B = split[:, None] * basis
    out = {}
    for method in methods:
        scaled, new_bias = coords, b
        if method == "nkp" and act != "identity":
            n = _row_norms(w)
            proj_norm = coords.norm(dim=1)
            rho = torch.where(n > 0, proj_norm / n.clamp_min(1e-300), torch.zeros_like(n)).clamp(0.0, 1.0)
            a = torch.zeros(m, dtype=torch.float64) if b is None else b
            t, c = fit_rows(act, a, n, rho, fit_bias=b is not None)
            scale = torch.where(proj_norm > 0, t / proj_norm.clamp_min(1e-300), torch.zeros_like(t))
            scaled = coords * scale[:, None]
            new_bias = None if b is None else c
        out[method] = Factorization(scaled / split, B, new_bias).to(dtype)
    return out


def error_curve(
    weight: torch.Tensor,
    ranks: list[int],
    method: str = "nkp",
    activation: str = "relu",
    bias: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    fit: bool = True,
) -> list[float]:
    """Relative Gaussian function error of ``method`` at each rank, from one subspace computation.

    The rank-r subspace is the first r directions of the largest one, so each rank only needs the
    per-row captured norms, never the product A B. ``fit=False`` skips the per-row nonlinear fit
    (except ReLU's closed form): an upper bound on the nkp error that is orders of magnitude
    cheaper, which is what rank allocation over many ranks and layers uses.
    """
    w = flatten_weight(weight).to(torch.float64)
    m, d = w.shape
    top = _check_rank(max(ranks), m, d)
    act = canonical_activation(activation)
    b = _check_bias(bias, m)
    alpha = _check_row_weights(row_weights, m)
    coords, _, _ = _subspace(w, top, alpha)
    n = w.norm(dim=1)
    a = torch.zeros(m, dtype=torch.float64) if b is None else b
    energy = second_moment(act, a, n)
    weights = torch.ones(m, dtype=torch.float64) if alpha is None else alpha
    total = float((weights * energy).sum())
    cum = torch.cumsum(coords * coords, dim=1)
    errors = []
    for r in ranks:
        captured = cum[:, r - 1].clamp_min(0.0).sqrt()
        rho = torch.where(n > 0, captured / n.clamp_min(1e-300), torch.zeros_like(n)).clamp(0.0, 1.0)
        if method == "nkp" and act == "relu" and b is None:
            e, c = 2.0 * n * arccos_kernel(rho), a  # the paper's closed form, cheap at every rank
        elif method == "nkp" and act != "identity" and fit:
            e, c = fit_rows(act, a, n, rho, fit_bias=b is not None)
        else:
            e, c = captured, a
        err = gaussian_row_error(act, a, n, c, e, rho)
        errors.append(float((weights * err).sum()) / total if total > 0 else 0.0)
    return errors


def fit_rows(
    activation: str,
    a: torch.Tensor,
    n: torch.Tensor,
    rho: torch.Tensor,
    fit_bias: bool,
    iterations: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best per-row (length t_i, bias c_i) of a row restricted to correlation ρ_i with w_i.

    Minimizes E[(σ(a + n u) − σ(c + t(ρ u + √(1−ρ²) v)))²] row by row, vectorized: a damped Newton
    method started from the spectral row (t = ρ n, c = a) that accepts a step only where it lowers
    the row's objective, inside a bounded box (t ∈ [0, 4n], |c − a| ≤ 4n). No row ends worse than
    its spectral start. ReLU without bias has the closed form t = 2 n κ(ρ).
    """
    act = canonical_activation(activation)
    a, n, rho = a.to(torch.float64), n.to(torch.float64), rho.to(torch.float64)
    live = n > 0
    t = rho * n
    c = a.clone()
    if act == "identity" or not live.any():
        return t, c
    if act == "relu" and not fit_bias and not a.any():
        return 2.0 * n * arccos_kernel(rho), c

    # Work in units of the row norm so that the box and the damping are scale-free. Only ReLU-like
    # activations are homogeneous, so the objective is evaluated at the row's real scale (÷ n²).
    idx = live.nonzero().squeeze(1)
    nr = n[idx]
    an, rn = a[idx] / nr, rho[idx]
    ones = torch.ones_like(an)

    def objective(tt: torch.Tensor, cc: torch.Tensor, nodes: int = _GH_2D_FIT) -> torch.Tensor:
        moment = second_moment(act, cc * nr, tt * nr) - 2.0 * cross_moment(act, a[idx], nr, cc * nr, tt * nr, rn, nodes)
        return moment / (nr * nr)

    p = torch.stack([rn.clone(), an.clone()], 1)
    if act == "relu":
        closed = torch.stack([2.0 * arccos_kernel(rn), an], 1)
        with torch.no_grad():
            better = objective(closed[:, 0], closed[:, 1]) < objective(p[:, 0], p[:, 1])
        p = torch.where(better[:, None], closed, p)
    lo = torch.stack([torch.zeros_like(an), an - 4.0], 1)
    hi = torch.stack([4.0 * ones, an + 4.0], 1)
    mask = torch.tensor([1.0, 1.0 if fit_bias else 0.0], dtype=torch.float64)
    with torch.no_grad():
        best = objective(p[:, 0], p[:, 1])
    for _ in range(iterations):
        q = p.clone().requires_grad_(True)
        loss = objective(q[:, 0], q[:, 1])
        (g,) = torch.autograd.grad(loss.sum(), q, create_graph=True)
        h0 = torch.autograd.grad(g[:, 0].sum(), q, retain_graph=True)[0]
        h1 = torch.autograd.grad(g[:, 1].sum(), q)[0] if fit_bias else torch.stack([h0[:, 1], ones], 1)
        g = g.detach() * mask
        hess = torch.stack([h0.detach(), h1.detach()], 1)
        if not fit_bias:
            hess[:, 0, 1] = hess[:, 1, 0] = 0.0
            hess[:, 1, 1] = 1.0
        # Shift the Hessian until it is positive definite (Levenberg–Marquardt style damping).
        evals = torch.linalg.eigvalsh(hess)
        damp = (1e-6 - evals[:, 0]).clamp_min(0.0) + 1e-9
        hess = hess + damp[:, None, None] * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, g.unsqueeze(-1)).squeeze(-1) * mask
        improved = torch.zeros_like(best, dtype=torch.bool)
        before = best.clone()
        with torch.no_grad():
            for frac in (1.0, 0.5, 0.25, 0.1):
                cand = torch.minimum(torch.maximum(p - frac * step, lo), hi)
                val = objective(cand[:, 0], cand[:, 1])
                take = torch.isfinite(val) & (val < best)
                p = torch.where(take[:, None], cand, p)
                best = torch.where(take, val, best)
                improved |= take
        if not improved.any() or float((before - best).max()) < 1e-10:
            break
    # Keep the spectral row wherever the fit is not better by the very rule function_error uses,
    # and where the row is fully captured (ρ = 1: the start is exact; quadrature noise must not
    # move it).
    with torch.no_grad():
        start = torch.stack([rn, an], 1)

        def final(q: torch.Tensor) -> torch.Tensor:
            return gaussian_row_error(act, a[idx], nr, q[:, 1] * nr, q[:, 0] * nr, rn)

        worse = final(p) >= final(start)
        worse |= rn >= 1.0 - 1e-9
    p = torch.where(worse[:, None], start, p)
    t_out, c_out = t.clone(), c.clone()
    t_out[idx] = p[:, 0] * n[idx]
    c_out[idx] = p[:, 1] * n[idx]
    return t_out, c_out


# ---------------------------------------------------------------- refinement


def refine(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factorization: Factorization,
    activation: str = "relu",
    inputs: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    row_weights: torch.Tensor | None = None,
    steps: int = 768,
    lr: float = 5e-3,
    batch_size: int = 512,
    samples: int = 1000,
    eval_every: int = 16,
    seed: int = 0,
    patience: int | None = None,
) -> tuple[Factorization, float, float]:
    """Adam on the sampled post-activation error (the paper's LFAI-WS-Adam), guarded.

    Inputs (n, d) default to ``samples`` Gaussian draws and targets (n, m) to σ(W x + b); held-out
    pairs default to as many fresh Gaussian draws. The learning rate is relative to each factor's
    RMS, gradients are clipped, and the iterate with the lowest held-out error is returned, so the
    result is never worse than the start on the held-out set. With ``patience`` the run stops after
    that many held-out evaluations without improvement.

    Returns (factorization, held-out error before, held-out error after), errors as mean Σ_i α_i (·)².
    """
    w = flatten_weight(weight).to(torch.float64)
    m, d = w.shape
    f = activation_fn(activation)
    b = torch.zeros(m, dtype=torch.float64) if bias is None else bias.to(torch.float64)
    alpha = _check_row_weights(row_weights, m)
    gen = torch.Generator().manual_seed(seed)
    if inputs is None:
        inputs = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    inputs = inputs.to(torch.float64)
    targets = f(inputs @ w.T + b) if targets is None else targets.to(torch.float64)
    if held_out is None:
        xh = torch.randn(max(samples, 256), d, generator=gen, dtype=torch.float64)
        held_out = (xh, f(xh @ w.T + b))
    xh, yh = held_out[0].to(torch.float64), held_out[1].to(torch.float64)

    dtype = torch.float32
    A = factorization.A.detach().to(dtype).clone().requires_grad_(True)
    B = factorization.B.detach().to(dtype).clone().requires_grad_(True)
    train_bias = factorization.bias is not None or bias is not None
    c0 = factorization.bias if factorization.bias is not None else torch.zeros(m)
    c = c0.detach().to(dtype).clone().requires_grad_(train_bias)
    x32, y32, xh32, yh32 = inputs.to(dtype), targets.to(dtype), xh.to(dtype), yh.to(dtype)
    a32 = None if alpha is None else alpha.to(dtype)

    def loss_on(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        diff = (f((x @ B.T) @ A.T + c) - y) ** 2
        return (diff if a32 is None else diff * a32).sum(1).mean()

    def rms(t: torch.Tensor) -> float:
        return float(t.detach().pow(2).mean().sqrt()) or 1.0

    bias_scale = max(rms(c), float(yh32.std()) if yh32.numel() > 1 else 1.0, 1e-3)
    groups = [{"params": [A], "lr": lr * rms(A)}, {"params": [B], "lr": lr * rms(B)}]
    if train_bias:
        groups.append({"params": [c], "lr": lr * bias_scale})
    opt = torch.optim.Adam(groups)
    with torch.no_grad():
        start = float(loss_on(xh32, yh32))
    best, best_state = start, None
    stale = 0
    clip = None
    n = x32.shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = loss_on(x32[idx], y32[idx])
        if not torch.isfinite(loss):
            break
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], clip if clip is not None else float("inf")))
        if clip is None:
            clip = 4.0 * norm if norm > 0 else float("inf")
        opt.step()
        if (step + 1) % eval_every == 0 or step == steps - 1:
            with torch.no_grad():
                val = float(loss_on(xh32, yh32))
            if math.isfinite(val) and val < best:
                best, best_state = val, (A.detach().clone(), B.detach().clone(), c.detach().clone())
                stale = 0
            else:
                stale += 1
                if patience is not None and stale >= patience:
                    break
    if best_state is None:
        return factorization, start, start
    out_bias = best_state[2] if train_bias else None
    out_dtype = factorization.A.dtype
    return Factorization(best_state[0], best_state[1], out_bias).to(out_dtype), start, best
