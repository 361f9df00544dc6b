"""Candidate factorizations of one layer on its calibration rows, and the choice among them.

Every registered method proposes a factorization (in the BN-folded space); the spectral start and
the best other start are refined; the candidate with the lowest held-out post-activation error is
kept, spectral winning ties.
"""

from __future__ import annotations

import math

import torch

from .activations import activation_fn, canonical_activation
from .factors import Factorization
from .gaussian import function_error
from .graph import LayerSite
from .methods import FitProblem, get_method, method_names
from .projection import factorize_all
from .refine import refine
from .responses import ResponseStats


def post_error(site: LayerSite, factors: Factorization, x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor | None) -> float:
    """Mean α-weighted squared post-activation error on (x, y) rows, relative to Σ α y²."""
    f = activation_fn(site.activation)
    with torch.no_grad():
        A, B = factors.A.to(torch.float32), factors.B.to(torch.float32)
        z = (x @ B.T) @ A.T
        if factors.bias is not None:
            z = z + factors.bias.to(torch.float32)
        diff = (f(z) - y) ** 2
        energy = y**2
        if alpha is not None:
            diff, energy = diff * alpha, energy * alpha
        total = float(energy.sum())
    return float(diff.sum()) / total if total > 0 else float(diff.sum())


def candidates(
    site: LayerSite,
    rank: int,
    stats: ResponseStats,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_held: torch.Tensor,
    y_held: torch.Tensor,
    refine_steps: int,
    seed: int,
    alpha: torch.Tensor | None = None,
    method: str = "nkp",
) -> tuple[dict[str, Factorization], dict[str, float], dict[str, float]]:
    """Every candidate (in BN-folded space) with its relative held-out post-activation error, and
    the Gaussian (data-free) relative function errors of spectral and nkp. ``alpha``: per-row
    weights of the errors (default: the site's own, from an affine after its activation)."""
    w, b = site.effective_weight()
    alpha = site.row_weights() if alpha is None else alpha
    act = canonical_activation(site.activation)
    base = factorize_all(w, rank, act, b, alpha)
    gaussian = {k: function_error(w, b, f, act, alpha, relative=True) for k, f in base.items()}
    problem = FitProblem(site, rank, w, b, act, alpha, stats)
    cands: dict[str, Factorization] = {k: base[k] if k in base else get_method(k).fit(problem)
                                       for k in method_names()}
    # A factorization without a bias cannot move the mean; give every candidate an explicit one.
    zeros = torch.zeros(w.shape[0], dtype=torch.float64)
    cands = {
        k: Factorization(f.A.to(torch.float64), f.B.to(torch.float64),
                         f.bias.to(torch.float64) if f.bias is not None else (zeros if b is None else b))
        for k, f in cands.items()
    }
    a32 = None if alpha is None else alpha.to(torch.float32)
    errors = {k: post_error(site, f, x_held, y_held, a32) for k, f in cands.items()}
    if refine_steps > 0:
        # Refine the SVD anchor and the best other start: refined candidates tend to converge to
        # similar optima, so refining every start costs time without changing the pick (refining
        # the best start alone lost 7.6 points on the digits CNN at --target-params 0.1).
        others = [k for k in cands if k != "spectral" and math.isfinite(errors[k])]
        starts = ["spectral"] + ([min(others, key=errors.__getitem__)] if others and method != "spectral" else [])
        for k in starts:
            if not math.isfinite(errors[k]):
                continue
            refined, _, _ = refine(
                w, None, cands[k], act, inputs=x_train, targets=y_train, held_out=(x_held, y_held),
                row_weights=alpha, steps=refine_steps, batch_size=256, eval_every=20, seed=seed, patience=4,
            )
            name = f"{k}+refine"
            cands[name] = refined
            errors[name] = post_error(site, refined, x_held, y_held, a32)
    return cands, errors, gaussian


def choose_candidate(errors: dict[str, float], method: str) -> str:
    """The lowest held-out error; spectral wins ties; ``--method spectral`` only picks spectral ones."""
    allowed = {k: v for k, v in errors.items() if math.isfinite(v) and (method != "spectral" or k.startswith("spectral"))}
    return min(allowed, key=lambda k: (allowed[k], not k.startswith("spectral")))
