"""Rank policies: how many ranks each layer keeps, planned before any layer is replaced.

For a layer with flattened weight W (m, d):
- ``rank N``: r = N, capped at the layer's max useful rank, the largest r with r·(m+d) < m·d.
- ``rank_ratio F``: r = round(F · min(m, d)) (the paper's "rank scale").
- ``param_ratio F``: the layer keeps F of its own weights: r = floor(F · m·d/(m+d)).
- ``target_params F`` / ``target_flops F``: the whole model keeps at most F of its parameters
  (or FLOPs); ranks are allocated across layers by measured error reduction per parameter
  (or FLOP) — see :mod:`lowrank_compress.allocation`.
- ``target_latency F``: the whole model's measured latency on the target is at most F × dense;
  ranks are allocated by error reduction per second of measured layer time.
Every rank is at least 1; ``round_to N`` rounds to a multiple of N. Without ``round_to`` the speed
budgets (``target_flops``, ``target_latency``) round to the target's multiple (:data:`TARGETS`; a small layer whose max useful rank is
below twice that multiple takes half of it, and so on); ``target_params`` and the per-layer
policies do not round (see :mod:`lowrank_compress.ranks`).
A layer is skipped, with the reason, when its rank would not save parameters (r·(m+d) ≥ m·d).

Latency-aware planning (on by default with a FLOPs or latency budget) times every planned layer,
dense and factorized, on the target at its real input shape (each batch size of
``latency_batch_size``) and keeps it dense where factorizing does not pay at one of them
(:mod:`lowrank_compress.latencyplan`); with a budget, the ranks are then re-allocated over the
layers that remain. Each layer's note or skip reason carries the measured times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .allocation import ErrorCurve, allocate
from .config import CompressConfig
from .graph import LayerSite
from .latencyplan import LayerTimer, TimingCache, timed_budget_plan
from .modelrun import count_flops, count_params
from .projection import error_curve
from .ranks import choose_rank, may_add_bias, output_positions, rank_multiple, site_ranks

# A layer's predicted error at each candidate rank.
CurveFn = Callable[[LayerSite, list[int]], list[float]]
# Ranks per site name, notes per site, skip reasons per site.
Planned = tuple[dict[str, int], dict[str, str], dict[str, str]]


def _budgeted_ranks(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    curve_fn: CurveFn,
    calibrated: bool = False,
) -> tuple[dict[str, int | None], dict[str, ErrorCurve]]:
    """Allocate ranks under --target-params / --target-flops from per-layer error curves.

    Ranks are rounded to the target's multiple; where even the smallest rounded ranks cannot meet
    the budget (a small model), any rank is allowed instead.
    """
    by_flops = config.target_flops is not None
    positions = output_positions(model, sites, example_inputs) if by_flops else {}
    total = float(count_flops(model, example_inputs)) if by_flops else float(count_params(model))
    budget = (config.target_flops if by_flops else config.target_params) * total
    for multiple in ([None, 1] if config.round_to is None else [None]):
        curves = []
        dense_total = 0.0
        for site in sites:
            m, d = site.shape
            per = 2.0 * positions.get(site.name, 1) if by_flops else 1.0
            ranks = site_ranks(site, config, multiple)
            if not ranks:
                continue
            # A factorized layer gains a bias where the nonlinear fit moves a bias-free layer's outputs.
            extra = 0.0 if by_flops or not may_add_bias(site, config.method, calibrated) else float(m)
            dense = per * m * d
            curves.append(ErrorCurve(site.name, ranks, [per * r * (m + d) + extra for r in ranks], [], dense))
            dense_total += dense
        fixed = total - dense_total
        if fixed + sum(min(c.costs) for c in curves) <= budget:
            break
    by_name = {s.name: s for s in sites}
    for curve in curves:
        curve.errors = curve_fn(by_name[curve.name], curve.ranks)
    return allocate(curves, budget, fixed_cost=fixed), {c.name: c for c in curves}



def _gaussian_curve(method: str) -> CurveFn:
    def curve(site: LayerSite, ranks: list[int]) -> list[float]:
        w, b = site.effective_weight()
        return error_curve(w, ranks, method, site.activation, b, site.row_weights(), fit=False)

    return curve


def plan_ranks(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    curve_fn: CurveFn | None = None,
    calibrated: bool = False,
    timing_cache: TimingCache | None = None,
) -> Planned:
    """Ranks per site name, notes per site, and skip reasons per site, for any policy.

    With latency-aware planning (``config.times_layers``) each planned layer is timed dense vs
    factorized on the target at its real input shape; layers where factorizing does not pay stay
    dense, and a budget is re-allocated over the remaining layers (reverting costs budget that
    other layers must give back). ``target_latency`` allocates by measured time. Times go through
    ``timing_cache`` when given (see :class:`~lowrank_compress.latencyplan.TimingCache`).
    """
    if config.times_layers and (config.target_flops is not None or config.target_latency is not None):
        return timed_budget_plan(model, sites, config, example_inputs, curve_fn or _gaussian_curve(config.method),
                                 timing_cache)
    ranks, notes, reasons = _plan_once(model, sites, config, example_inputs, curve_fn, calibrated)
    if not config.times_layers:
        return ranks, notes, reasons
    timer = LayerTimer(model, sites, example_inputs, config, timing_cache)
    reverted: dict[str, str] = {}
    for _ in range(4):
        slow = {}
        for site in sites:
            if site.name not in ranks:
                continue
            times = timer.times(site, [ranks[site.name]])
            dense, factor = times[None], times[ranks[site.name]]
            timing = timer.describe(dense, factor)
            if not timer.pays(dense, factor):
                slow[site.name] = f"kept dense by latency-aware planning: {timing}"
            else:
                notes[site.name] = "; ".join(n for n in (notes.get(site.name), f"factorized: {timing}") if n)
        if not slow:
            break
        reverted.update(slow)
        remaining = [s for s in sites if s.name not in reverted]
        ranks, notes, reasons = _plan_once(model, remaining, config, example_inputs, curve_fn, calibrated)
        if config.target_params is None and config.target_flops is None:
            break
    reasons.update(reverted)
    return ranks, notes, reasons


def _plan_once(model: nn.Module, sites: list[LayerSite], config: CompressConfig, example_inputs: Any,
               curve_fn: CurveFn | None = None, calibrated: bool = False) -> Planned:
    """One pass of a policy over ``sites``: ranks, notes and skip reasons, nothing timed."""
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
        extra = site.shape[0] if may_add_bias(site, config.method, calibrated) else 0
        choice = choose_rank(site, config.rank, config.rank_ratio, config.param_ratio, rank_multiple(config), extra)
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
