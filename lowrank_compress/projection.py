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

import torch

from .activations import canonical_activation
from .factors import (LARGE_WEIGHT, Factorization, check_bias, check_finite, check_rank, check_row_weights,
                      flatten_weight, row_blocks, row_norms)
from .gaussian import arccos_kernel, cross_moment, gaussian_row_error, second_moment

METHODS = ("nkp", "spectral")
_GH_2D_FIT = 24  # the per-row fit uses a coarser quadrature grid; the result is checked on the fine one


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
        coords = torch.cat([block @ vt.T for _, block in row_blocks(w)])
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


def spectral_factors(weight: torch.Tensor, rank: int, bias: torch.Tensor | None = None,
                     row_weights: torch.Tensor | None = None) -> Factorization:
    """Rank-r SVD truncation split as A = U√S, B = √S Vᵀ (Khodak et al. 2021).

    With ``row_weights`` α the subspace is that of diag(√α) W, the best α-weighted truncation.
    """
    return factorize(weight, rank, method="spectral", activation="identity", bias=bias, row_weights=row_weights)


def kernel_projection(weight: torch.Tensor, rank: int, activation: str = "relu", bias: torch.Tensor | None = None,
                      row_weights: torch.Tensor | None = None) -> Factorization:
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
    rank = check_rank(rank, m, d)
    unknown = [mt for mt in methods if mt not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    act = canonical_activation(activation)
    check_finite("weight", w)
    b = check_bias(bias, m)
    alpha = check_row_weights(row_weights, m)
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
            n = row_norms(w)
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
    top = check_rank(max(ranks), m, d)
    act = canonical_activation(activation)
    b = check_bias(bias, m)
    alpha = check_row_weights(row_weights, m)
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
