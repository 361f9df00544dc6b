"""Rank policies: how many ranks each layer keeps, planned before any layer is replaced.

For a layer with flattened weight W (m, d):
- ``rank N``: r = N, capped at the layer's max useful rank, the largest r with r·(m+d) < m·d.
- ``rank_ratio F``: r = round(F · min(m, d)) (the paper's "rank scale").
- ``param_ratio F``: the layer keeps F of its own weights: r = floor(F · m·d/(m+d)).
- ``target_params F`` / ``target_flops F``: the whole model keeps at most F of its parameters
  (or FLOPs); ranks are allocated across layers by measured error reduction per parameter
  (or FLOP) — see :mod:`lowrank_compress.allocation`.
Every rank is at least 1; ``round_to N`` rounds to a multiple of N. A layer is skipped, with the
reason, when its rank would not save parameters (r·(m+d) ≥ m·d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .allocation import ErrorCurve, allocate
from .config import CompressConfig
from .graph import LayerSite
from .layers import from_dense
from .modelrun import count_flops, count_params, forward_with_hooks
from .projection import Factorization, error_curve


@dataclass
class RankChoice:
    """The rank chosen for a site, or why it is left dense."""

    rank: int | None
    note: str | None = None
    skip_reason: str | None = None


def saves_parameters(rank: int, m: int, d: int, extra: int = 0) -> bool:
    """Whether rank-r factors (plus ``extra`` parameters, e.g. a newly fitted bias) beat m·d."""
    return rank * (m + d) + extra < m * d


def round_rank(rank: int, multiple: int, max_rank: int) -> int:
    """Round to the nearest multiple of ``multiple``, never above ``max_rank`` (0 if none fits)."""
    if multiple <= 1:
        return rank
    rounded = max(multiple, int(round(rank / multiple)) * multiple)
    while rounded > max_rank and rounded > 0:
        rounded -= multiple
    return rounded


def choose_rank(
    site: LayerSite,
    rank: int | None = None,
    rank_ratio: float | None = None,
    param_ratio: float | None = None,
    round_to: int = 1,
    extra_params: int = 0,
) -> RankChoice:
    """Apply one uniform policy (rank, rank_ratio or param_ratio) to one site.

    ``extra_params``: what the factorized layer may gain besides its factors (a bias fitted for a
    bias-free layer), so that a capped rank still saves parameters.
    """
    m, d = site.shape
    max_rank = max(0, min(site.max_useful_rank, (m * d - extra_params - 1) // (m + d)))
    note = None
    if rank is not None:
        r = rank
        if r > max_rank:
            note = f"rank {rank} capped at the max useful rank {max_rank}"
            r = max_rank
    elif rank_ratio is not None:
        r = max(1, int(round(rank_ratio * min(m, d))))
    elif param_ratio is not None:
        r = max(1, math.floor(param_ratio * m * d / (m + d)))
    else:
        raise ValueError("no rank policy given")
    if round_to > 1:
        rounded = round_rank(r, round_to, max_rank)
        if rounded < 1:
            return RankChoice(None, skip_reason=f"no multiple of {round_to} below the max useful rank {max_rank}")
        if rounded != r:
            note = f"rank {r} rounded to {rounded}"
        r = rounded
    if r < 1 or not saves_parameters(r, m, d, extra_params):
        return RankChoice(None, skip_reason=f"rank {r} would not save parameters (max useful rank {max_rank})")
    return RankChoice(r, note=note)


def _output_positions(model: nn.Module, sites: list[LayerSite], example_inputs: Any) -> dict[str, int]:
    """Per site, output positions per forward (spatial size for convs, tokens for Linear)."""
    positions: dict[str, int] = {}

    def hook(name: str, m: int):
        def record(_module, _inputs, output):
            positions[name] = positions.get(name, 0) + output.numel() // m

        return record

    forward_with_hooks(model, [(s.module, hook(s.name, s.shape[0])) for s in sites], example_inputs)
    return positions


def _rank_grid(max_rank: int, round_to: int, points: int = 24) -> list[int]:
    """Candidate ranks from 1 (or round_to) to max_rank, denser at small ranks."""
    grid = {max(1, int(round(max_rank ** (i / (points - 1))))) for i in range(points)}
    grid |= {max(1, int(round(max_rank * i / (points - 1)))) for i in range(1, points)}
    if round_to > 1:
        grid = {(r // round_to) * round_to for r in grid if r >= round_to}
    return sorted(r for r in grid if 1 <= r <= max_rank)


def _budgeted_ranks(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    curve_fn: Callable[[LayerSite, list[int]], list[float]],
    calibrated: bool = False,
) -> tuple[dict[str, int | None], dict[str, ErrorCurve]]:
    """Allocate ranks under --target-params / --target-flops from per-layer error curves."""
    by_flops = config.target_flops is not None
    positions = _output_positions(model, sites, example_inputs) if by_flops else {}
    curves = []
    dense_total = 0.0
    for site in sites:
        m, d = site.shape
        per = 2.0 * positions.get(site.name, 1) if by_flops else 1.0
        ranks = [r for r in _rank_grid(site.max_useful_rank, config.round_to) if saves_parameters(r, m, d)]
        if not ranks:
            continue
        # A factorized layer gains a bias where the nonlinear fit moves a bias-free layer's outputs.
        extra = 0.0 if by_flops or not _may_add_bias(site, config.method, calibrated) else float(m)
        errors = curve_fn(site, ranks)
        dense = per * m * d
        curves.append(ErrorCurve(site.name, ranks, [per * r * (m + d) + extra for r in ranks], errors, dense))
        dense_total += dense
    total = float(count_flops(model, example_inputs)) if by_flops else float(count_params(model))
    budget = (config.target_flops if by_flops else config.target_params) * total
    fixed = total - dense_total
    return allocate(curves, budget, fixed_cost=fixed), {c.name: c for c in curves}


def _may_add_bias(site: LayerSite, method: str, calibrated: bool = False) -> bool:
    """Whether factorizing may give a bias-free layer a bias (calibrated candidates all fit one)."""
    if site.module.bias is not None:
        return False
    return calibrated or (method == "nkp" and (site.bn_before is not None or site.activation != "identity"))


def _gaussian_curve(method: str) -> Callable[[LayerSite, list[int]], list[float]]:
    def curve(site: LayerSite, ranks: list[int]) -> list[float]:
        w, b = site.effective_weight()
        return error_curve(w, ranks, method, site.activation, b, site.row_weights(), fit=False)

    return curve


def plan_ranks(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    curve_fn: Callable[[LayerSite, list[int]], list[float]] | None = None,
    calibrated: bool = False,
) -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
    """Ranks per site name, notes per site, and skip reasons per site, for any policy.

    With ``config.latency_aware`` each planned layer is timed dense vs factorized on its real
    input shape; layers that are not faster factorized stay dense, and a budget is re-allocated
    over the remaining layers (reverting costs budget that other layers must give back).
    """
    ranks, notes, reasons = _plan_once(model, sites, config, example_inputs, curve_fn, calibrated)
    if not config.latency_aware:
        return ranks, notes, reasons
    reverted: dict[str, str] = {}
    for _ in range(3):
        slow = _not_faster(model, [s for s in sites if s.name in ranks], ranks, example_inputs, config)
        if not slow:
            break
        reverted.update(slow)
        remaining = [s for s in sites if s.name not in reverted]
        ranks, notes, reasons = _plan_once(model, remaining, config, example_inputs, curve_fn, calibrated)
        if config.target_params is None and config.target_flops is None:
            break
    reasons.update({name: f"reverted by --latency-aware: {why}" for name, why in reverted.items()})
    return ranks, notes, reasons


def _layer_inputs(model: nn.Module, sites: list[LayerSite], example_inputs: Any) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, inputs, _output):
            captured.setdefault(name, inputs[0].detach())

        return record

    forward_with_hooks(model, [(s.module, hook(s.name)) for s in sites], example_inputs)
    return captured


def _not_faster(
    model: nn.Module, sites: list[LayerSite], ranks: dict[str, int], example_inputs: Any, config: CompressConfig
) -> dict[str, str]:
    """Sites whose factorized form is not faster than the dense layer, with the timings."""
    from .bench import layer_latency

    inputs = _layer_inputs(model, sites, example_inputs)
    slow = {}
    gen = torch.Generator().manual_seed(config.seed)
    for site in sites:
        x = inputs.get(site.name)
        if x is None:
            continue
        x = x[:1].expand(config.latency_batch_size, *x.shape[1:]).contiguous()
        m, d = site.shape
        r = ranks[site.name]
        w = site.module.weight
        probe = Factorization(torch.randn(m, r, generator=gen).to(w.dtype), torch.randn(r, d, generator=gen).to(w.dtype))
        dense_s, factor_s = layer_latency(site.module, from_dense(site.module, probe), x, runtime=config.latency_runtime)
        if factor_s >= dense_s:
            slow[site.name] = f"factorized {factor_s * 1e3:.3f} ms ≥ dense {dense_s * 1e3:.3f} ms"
    return slow


def _plan_once(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    curve_fn: Callable[[LayerSite, list[int]], list[float]] | None = None,
    calibrated: bool = False,
) -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
    ranks: dict[str, int] = {}
    notes: dict[str, str] = {}
    reasons: dict[str, str] = {}
    if config.target_params is not None or config.target_flops is not None:
        curve = curve_fn or _gaussian_curve(config.method)
        allocation, _ = _budgeted_ranks(model, sites, config, example_inputs, curve, calibrated)
        for site in sites:
            r = allocation.get(site.name)
            if r is None:
                reasons[site.name] = (
                    "kept dense by the budget allocation" if site.name in allocation else "no rank saves parameters"
                )
            else:
                ranks[site.name] = r
        return ranks, notes, reasons
    for site in sites:
        extra = site.shape[0] if _may_add_bias(site, config.method, calibrated) else 0
        choice = choose_rank(site, config.rank, config.rank_ratio, config.param_ratio, config.round_to, extra)
        if choice.rank is None:
            reasons[site.name] = choice.skip_reason or "skipped"
        else:
            ranks[site.name] = choice.rank
            if choice.note:
                notes[site.name] = choice.note
    return ranks, notes, reasons


@dataclass
class PlanEntry:
    """What happens to one layer: its rank (None: kept dense, with the reason) and how it is fitted.

    ``predicted_cost``: with network-aware calibration, the predicted increase of the output metric
    from this layer alone at this rank (first order, see :mod:`lowrank_compress.outputcost`).
    """

    name: str
    rank: int | None
    method: str
    reason: str | None = None
    note: str | None = None
    predicted_cost: float | None = None


@dataclass
class Plan:
    entries: list[PlanEntry]
    output_metric: str | None = None

    @classmethod
    def from_ranks(cls, sites: list[LayerSite], ranks: dict[str, int], notes: dict[str, str],
                   reasons: dict[str, str], method: str, costs: dict[str, float] | None = None,
                   output_metric: str | None = None) -> Plan:
        costs = costs or {}
        entries = [PlanEntry(s.name, ranks.get(s.name), method, reasons.get(s.name), notes.get(s.name),
                             costs.get(s.name)) for s in sites]
        return cls(entries, output_metric)

    @property
    def ranks(self) -> dict[str, int]:
        return {e.name: e.rank for e in self.entries if e.rank is not None}

    @property
    def predicted_output_cost(self) -> float | None:
        costs = [e.predicted_cost for e in self.entries if e.rank is not None and e.predicted_cost is not None]
        return sum(costs) if costs else None
