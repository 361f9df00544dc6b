"""Factorization methods: a registry of ways to turn one layer into rank-r factors.

A method is a function ``fit(problem) -> Factorization`` registered under a name. Data-free
methods see the (BN-folded) weight only; calibrated ones also get the layer's response
statistics. With calibration every registered method is a candidate and the one with the lowest
held-out error is kept; without, ``CompressConfig.method`` names the one to use. Adding a method
is one decorated function, in this file or anywhere else::

    @register_method("mine")
    def mine(problem: FitProblem) -> Factorization: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .factors import Factorization
from .projection import factorize_all

if TYPE_CHECKING:
    from .graph import LayerSite
    from .responses import ResponseStats


@dataclass
class FitProblem:
    """One layer to factorize: W (m, d) and b with BatchNorm before it folded in, float64."""

    site: LayerSite
    rank: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str
    row_weights: torch.Tensor | None = None
    stats: ResponseStats | None = None


@dataclass
class MethodSpec:
    name: str
    fit: Callable[[FitProblem], Factorization]
    calibrated: bool
    description: str


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, calibrated: bool = False, description: str = ""):
    """Register ``fit`` under ``name`` (``calibrated=True``: it needs ``problem.stats``)."""

    def decorate(fit: Callable[[FitProblem], Factorization]) -> Callable[[FitProblem], Factorization]:
        _REGISTRY[name] = MethodSpec(name, fit, calibrated, description or (fit.__doc__ or "").split("\n")[0])
        return fit

    return decorate


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def method_names(data_free: bool = False) -> tuple[str, ...]:
    """Registered names (``data_free=True``: only those that need no calibration data)."""
    return tuple(n for n, spec in _REGISTRY.items() if not (data_free and spec.calibrated))


def get_method(name: str) -> MethodSpec:
    return _REGISTRY[name]


@register_method("spectral", description="truncated SVD of the weight (U√S, √S Vᵀ)")
def spectral(problem: FitProblem) -> Factorization:
    return factorize_all(problem.weight, problem.rank, problem.activation, problem.bias, problem.row_weights,
                         methods=("spectral",))["spectral"]


@register_method("nkp", description="nonlinear kernel projection under Gaussian inputs (data-free)")
def nkp(problem: FitProblem) -> Factorization:
    return factorize_all(problem.weight, problem.rank, problem.activation, problem.bias, problem.row_weights,
                         methods=("nkp",))["nkp"]


@register_method("nkp_calibrated", calibrated=True,
                 description="response-space projection of the calibration responses with a per-row fit")
def nkp_calibrated(problem: FitProblem) -> Factorization:
    from .responses import response_projection

    return response_projection(problem.weight, problem.bias, problem.stats, problem.rank, problem.activation,
                               problem.row_weights)


def unfold_batchnorm(site: LayerSite, factors: Factorization) -> Factorization:
    """Turn factors of the BN-folded layer back into factors of the layer itself.

    The folded layer computes scale·(W x + b) + shift; the factorized layer keeps BatchNorm after
    it, so A = A_eff / scale and c = (c_eff − shift) / scale. Channels that BatchNorm zeroes out
    (scale ≈ 0) do not matter downstream and get zero rows. A bias that comes out all zero on a
    layer that had none is dropped.
    """
    bias = site.module.bias
    A = factors.A.to(torch.float64)
    base = None if bias is None else bias.detach().to(torch.float64)
    c = None if factors.bias is None else factors.bias.to(torch.float64)
    if site.bn_before is not None:
        scale = site.bn_before.scale.to(torch.float64)
        shift = site.bn_before.shift.to(torch.float64)
        dead = scale.abs() <= scale.abs().max().clamp_min(1e-300) * 1e-12
        safe = torch.where(dead, torch.ones_like(scale), scale)
        A = A / safe[:, None]
        A[dead] = 0.0
        zero = torch.zeros_like(scale) if base is None else base
        c_eff = c if c is not None else zero * scale + shift
        c = torch.where(dead, zero, (c_eff - shift) / safe)
    if c is not None and base is None:
        # Compare with the bias that would be there at rest (the BN shift mapped back), not with 0.
        if bool((c.abs() <= 1e-7 * (c.abs().max() + A.abs().max() + 1e-30)).all()):
            c = None
    dtype = factors.A.dtype
    return Factorization(A.to(dtype), factors.B, None if c is None else c.to(dtype))


def factor_params(site: LayerSite, rank: int, has_bias: bool) -> int:
    """Parameters of a rank-r factorized layer: r (m + d), plus m for a bias."""
    m, d = site.shape
    return rank * (m + d) + (m if has_bias else 0)
