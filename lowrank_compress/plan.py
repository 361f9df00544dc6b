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
policies do not round.
A layer is skipped, with the reason, when its rank would not save parameters (r·(m+d) ≥ m·d).

Latency-aware planning (on by default with a FLOPs or latency budget) times every planned layer,
dense and factorized, on the target at its real input shape (batch ``latency_batch_size``) and
keeps it dense where factorizing does not pay; with a budget, the ranks are then re-allocated over
the layers that remain. Each layer's note or skip reason carries the measured times.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .allocation import ErrorCurve, allocate
from .config import CompressConfig
from .errors import UsageError
from .graph import LayerSite
from .layers import from_dense
from .modelrun import count_flops, count_params, forward_with_hooks, replace_module
from .factors import Factorization
from .projection import error_curve


@dataclass(frozen=True)
class Target:
    """A deployment runtime and device: where layers are timed and the rank multiple that suits it."""

    name: str
    runtime: str  # "onnxruntime" or "torch"
    device: str  # "cpu" or "cuda"
    rank_multiple: int


TARGETS = {
    # onnxruntime's fast CPU convolutions run in its blocked NCHWc layout: blocks of 16 channels with
    # AVX-512, 8 with AVX2. A rank off the block takes the pair out of the layout (reorders, lost fusions).
    "onnxruntime-cpu": Target("onnxruntime-cpu", "onnxruntime", "cpu", 16),
    # oneDNN's blocked layouts: 16 channels with AVX-512.
    "torch-cpu": Target("torch-cpu", "torch", "cpu", 16),
    # Tensor cores take bf16/fp16 matrix dimensions in multiples of 8.
    "torch-cuda": Target("torch-cuda", "torch", "cuda", 8),
    "onnxruntime-cuda": Target("onnxruntime-cuda", "onnxruntime", "cuda", 8),
}
# The speed budgets round ranks to the target's multiple; a parameter budget is about size, where
# rounding a narrow layer's rank to 16 costs accuracy and saves nothing (the digits CNN at
# --target-params 0.1 lost 3 points to it).
_BUDGETS = ("target_flops", "target_latency")


def rank_multiple(config: CompressConfig) -> int:
    """What ranks are rounded to: ``round_to``, else the target's multiple for budgets, else 1."""
    if config.round_to is not None:
        return config.round_to
    return TARGETS[config.target].rank_multiple if config.policy in _BUDGETS else 1


def _site_multiple(max_rank: int, multiple: int, explicit: bool) -> int:
    """The multiple for one layer: a target's multiple halves until the layer has two of them."""
    while not explicit and multiple > 1 and max_rank < 2 * multiple:
        multiple //= 2
    return multiple


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
    """Allocate ranks under --target-params / --target-flops from per-layer error curves.

    Ranks are rounded to the target's multiple; where even the smallest rounded ranks cannot meet
    the budget (a small model), any rank is allowed instead.
    """
    by_flops = config.target_flops is not None
    positions = _output_positions(model, sites, example_inputs) if by_flops else {}
    total = float(count_flops(model, example_inputs)) if by_flops else float(count_params(model))
    budget = (config.target_flops if by_flops else config.target_params) * total
    for multiple in ([None, 1] if config.round_to is None else [None]):
        curves = []
        dense_total = 0.0
        for site in sites:
            m, d = site.shape
            per = 2.0 * positions.get(site.name, 1) if by_flops else 1.0
            ranks = _site_ranks(site, config, multiple)
            if not ranks:
                continue
            # A factorized layer gains a bias where the nonlinear fit moves a bias-free layer's outputs.
            extra = 0.0 if by_flops or not _may_add_bias(site, config.method, calibrated) else float(m)
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


def _site_ranks(site: LayerSite, config: CompressConfig, multiple: int | None = None) -> list[int]:
    """Candidate ranks of a site under a budget: rounded as the target wants (or to ``multiple``),
    each saving parameters."""
    m, d = site.shape
    if multiple is None:
        multiple = _site_multiple(site.max_useful_rank, rank_multiple(config), config.round_to is not None)
    return [r for r in _rank_grid(site.max_useful_rank, multiple) if saves_parameters(r, m, d)]


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

    With latency-aware planning (``config.times_layers``) each planned layer is timed dense vs
    factorized on the target at its real input shape; layers where factorizing does not pay stay
    dense, and a budget is re-allocated over the remaining layers (reverting costs budget that
    other layers must give back). ``target_latency`` allocates by measured time.
    """
    if config.times_layers and (config.target_flops is not None or config.target_latency is not None):
        return _timed_budget_plan(model, sites, config, example_inputs, curve_fn or _gaussian_curve(config.method))
    ranks, notes, reasons = _plan_once(model, sites, config, example_inputs, curve_fn, calibrated)
    if not config.times_layers:
        return ranks, notes, reasons
    timer = LayerTimer(model, sites, example_inputs, config)
    reverted: dict[str, str] = {}
    for _ in range(4):
        slow = {}
        for site in sites:
            if site.name not in ranks:
                continue
            times = timer.times(site, [ranks[site.name]])
            dense_s, factor_s = times[None], times[ranks[site.name]]
            timing = timer.describe(dense_s, factor_s)
            if factor_s >= PAYS * dense_s:
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


# A factorized layer must take less than this share of the dense layer's time to be kept. Below
# 1.0: a layer that saves a few percent is within the timing noise, and under a FLOPs budget the
# FLOPs it would save are better spent on layers where they become time.
PAYS = 0.9


class LayerTimer:
    """Times sites dense and factorized on the config's target at their real inputs, with a cache.

    Each layer is run alone at its input captured from one forward pass of ``example_inputs``,
    batch expanded to ``config.latency_batch_size``. The factorized versions use random factors
    (time does not depend on the values). Dense and factorized runs of one layer are interleaved.
    """

    def __init__(self, model: nn.Module, sites: list[LayerSite], example_inputs: Any, config: CompressConfig):
        self.target = TARGETS[config.target]
        self.batch = config.latency_batch_size
        self.seed = config.seed
        self.inputs = _layer_inputs(model, sites, example_inputs)
        self.cache: dict[tuple[str, int | None], float] = {}

    def describe(self, dense_s: float, factor_s: float) -> str:
        return (f"{self.target.name} batch {self.batch}: dense {dense_s * 1e3:.3f} ms, "
                f"factorized {factor_s * 1e3:.3f} ms ({factor_s / dense_s:.2f}×)")

    def times(self, site: LayerSite, ranks: list[int]) -> dict[int | None, float]:
        """Median seconds per call, dense (key None) and at each rank; cached per (site, rank)."""
        from .bench import layer_latencies

        todo = [r for r in ranks if (site.name, r) not in self.cache]
        if todo or (site.name, None) not in self.cache:
            x = self.inputs.get(site.name)
            if x is None:
                raise UsageError(f"layer {site.name} did not run on the example inputs; it cannot be timed")
            x = x[:1].expand(self.batch, *x.shape[1:]).contiguous()
            gen = torch.Generator().manual_seed(self.seed)
            m, d = site.shape
            w = site.module.weight
            layers: dict[str, nn.Module] = {"dense": site.module}
            for r in todo:
                probe = Factorization(torch.randn(m, r, generator=gen).to(w.dtype), torch.randn(r, d, generator=gen).to(w.dtype))
                layers[str(r)] = from_dense(site.module, probe)
            measured = layer_latencies(layers, x, self.target.runtime, self.target.device)
            self.cache[(site.name, None)] = measured["dense"]
            for r in todo:
                self.cache[(site.name, r)] = measured[str(r)]
        return {r: self.cache[(site.name, r)] for r in [None, *ranks]}

    def model_ratio(self, model: nn.Module, sites: list[LayerSite], ranks: dict[str, int], example_inputs: Any) -> float:
        """Measured latency of ``model`` with ``ranks`` applied (random factors) / the dense model's.

        Both whole models are timed interleaved and, like the layers, by their fastest run, so
        that layer and model times are comparable on a loaded machine.
        """
        from .bench import layer_latencies

        if not isinstance(example_inputs, torch.Tensor):
            raise UsageError("--target-latency times the whole model; it needs a single tensor input")
        probe = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(self.seed)
        for site in sites:
            if site.name in ranks:
                m, d = site.shape
                old = probe.get_submodule(site.name)
                r = ranks[site.name]
                factors = Factorization(torch.randn(m, r, generator=gen), torch.randn(r, d, generator=gen))
                replace_module(probe, old, from_dense(old, factors.to(old.weight.dtype)))
        times = layer_latencies({"dense": model, "compressed": probe}, self.model_input(example_inputs),
                                self.target.runtime, self.target.device, repeats=MODEL_REPEATS)
        return times["compressed"] / times["dense"]

    def model_input(self, example_inputs: torch.Tensor) -> torch.Tensor:
        """The example input at the timing batch size."""
        x = example_inputs.detach()[:1]
        return x.expand(self.batch, *x.shape[1:]).contiguous()


MODEL_REPEATS = 10
# --target-latency: whole-model checks at most, and how far under the budget a plan may land.
LATENCY_CHECKS = 4
LATENCY_SLACK = 0.05


def _layer_inputs(model: nn.Module, sites: list[LayerSite], example_inputs: Any) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, inputs, _output):
            captured.setdefault(name, inputs[0].detach())

        return record

    forward_with_hooks(model, [(s.module, hook(s.name)) for s in sites], example_inputs)
    return captured


def _probe_ranks(ranks: list[int], points: int = 4) -> list[int]:
    """Up to ``points`` ranks spread over ``ranks`` (sorted), the smallest and largest included."""
    if len(ranks) <= points:
        return list(ranks)
    return sorted({ranks[round(i * (len(ranks) - 1) / (points - 1))] for i in range(points)})


def _timed_budget_plan(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    curve_fn: Callable[[LayerSite, list[int]], list[float]],
) -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
    """A FLOPs or latency budget, allocated by error reduction per second of measured layer time.

    Each layer is timed dense and factorized at a few ranks of its grid (times in between are
    interpolated linearly in the rank); ranks whose time is not below ``PAYS`` × dense are dropped.
    Layer times measured alone include what the runtime adds around a lone layer (layout
    reorders), the same for dense and factorized, so the plan is judged by their differences.

    ``target_flops`` F: the largest time budget whose allocation keeps at most F of the FLOPs (the
    FLOPs are spent where they buy the most time). ``target_latency`` F: the layers' time budget is
    g × their dense time, g starting at F; each plan is checked by timing the whole model with its
    ranks against the dense model, and g is scaled by F / measured ratio until the ratio lands in
    [F − LATENCY_SLACK, F]; the plan kept is the slowest one within F (else the fastest tried).
    """
    timer = LayerTimer(model, sites, example_inputs, config)
    positions = _output_positions(model, sites, example_inputs)
    curves, reasons, notes = [], {}, {}
    saved_flops: dict[str, Callable[[int], float]] = {}
    for site in sites:
        ranks = _site_ranks(site, config)
        if not ranks:
            reasons[site.name] = "no rank saves parameters"
            continue
        probes = _probe_ranks(ranks)
        times = timer.times(site, probes)
        dense_s = times[None]
        costs = [float(c) for c in np.interp(ranks, probes, [times[r] for r in probes])]
        paying = [(r, c) for r, c in zip(ranks, costs) if c < PAYS * dense_s]
        if not paying:
            reasons[site.name] = f"kept dense by latency-aware planning: {timer.describe(dense_s, min(costs))}"
            continue
        kept = [r for r, _ in paying]
        curves.append(ErrorCurve(site.name, kept, [c for _, c in paying], curve_fn(site, kept), dense_s))
        m, d = site.shape
        per = 2.0 * positions.get(site.name, 1)
        saved_flops[site.name] = lambda r, per=per, m=m, d=d: per * (m * d - r * (m + d))
    dense_layers = sum(c.dense_cost for c in curves)
    if config.target_flops is not None:
        total_flops = float(count_flops(model, example_inputs))
        limit = config.target_flops * total_flops

        def fits(alloc: dict[str, int | None]) -> bool:
            return total_flops - sum(saved_flops[n](r) for n, r in alloc.items() if r is not None) <= limit

        lo, hi = 0.0, dense_layers
        best = allocate(curves, lo)
        for _ in range(40):
            mid = (lo + hi) / 2
            alloc = allocate(curves, mid)
            if fits(alloc):
                lo, best = mid, alloc
            else:
                hi = mid
        ranks = {name: r for name, r in best.items() if r is not None}
        ratio = None
    else:
        # Layer times are short runs and the whole model a long one: on a loaded machine they are
        # not comparable in absolute terms, so the layers' time budget is a fraction g of their
        # dense time, and g is set from the measured whole-model ratio (a ratio of two long runs,
        # interleaved), starting at F and scaled by F / measured ratio.
        fraction, tried = config.target_latency, []
        for _ in range(LATENCY_CHECKS):
            allocation = allocate(curves, fraction * dense_layers)
            candidate = {name: r for name, r in allocation.items() if r is not None}
            measured = timer.model_ratio(model, sites, candidate, example_inputs)
            tried.append((measured, candidate))
            if config.target_latency - LATENCY_SLACK <= measured <= config.target_latency:
                break
            fraction = min(1.0, fraction * config.target_latency / measured)
        meeting = [t for t in tried if t[0] <= config.target_latency]
        ratio, ranks = max(meeting, key=lambda t: t[0]) if meeting else min(tried, key=lambda t: t[0])
    for curve in curves:
        dense_s = curve.dense_cost
        if curve.name in ranks:
            factor_s = curve.costs[curve.ranks.index(ranks[curve.name])]
            note = f"factorized: {timer.describe(dense_s, factor_s)}"
            if ratio is not None:
                note += f"; whole model measured at {ratio:.2f}× dense"
            notes[curve.name] = note
        else:
            budget_name = "FLOPs" if config.target_flops is not None else "latency"
            reasons[curve.name] = (f"kept dense by the {budget_name} budget allocation (timed on "
                                   f"{timer.target.name}: dense {dense_s * 1e3:.3f} ms, fastest factorized "
                                   f"{min(curve.costs) * 1e3:.3f} ms)")
    return ranks, notes, reasons


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
