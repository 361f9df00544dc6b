"""Latency-aware planning: layers timed dense and factorized on the target, budgets in measured time.

Every planned layer is timed alone on the target at its real input shape, at each batch size of
``latency_batch_size``; a layer where factorizing does not pay at every one of them stays dense.
Under a FLOPs or latency budget, ranks are allocated by error reduction per second of measured layer time
(:func:`timed_budget_plan`), and the plan is checked by timing the whole model: a latency budget's
against F, a FLOPs budget's against the dense model (below ``FASTER`` × its time).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .allocation import ErrorCurve, allocate
from .config import CompressConfig
from .errors import UsageError
from .factors import Factorization
from .graph import LayerSite
from .layers import from_dense
from .modelrun import count_flops, forward_with_hooks, replace_module
from .ranks import TARGETS, output_positions, site_ranks


# A factorized layer must take less than this share of the dense layer's time to be kept. Below
# 1.0: a layer that saves a few percent is within the timing noise, and under a FLOPs budget the
# FLOPs it would save are better spent on layers where they become time.
PAYS = 0.9


# A FLOPs budget's planned model must measure below this share of the dense model's time at every
# timing batch size, or layers go back to dense: a whole model's timing moves by a few percent, and
# a plan within them of the dense time has not made the model faster.
FASTER = 0.97

Times = tuple[float, ...]  # seconds per call (fastest run), one per timing batch size


class TimingCache:
    """Measured times, kept so that planning again reuses them and makes the same plan.

    Keys say everything a time depends on: the runtime fingerprint (runtime and version, processor
    or GPU, thread counts), the layer (its type and configuration, dtype), its input shape per
    sample, the batch size and the rank (or dense); a whole model's measured ratio (compressed over
    dense, the one entry that is not seconds) is keyed by a hash of its structure and ranks.
    Identical layers of one model share their timings. A rank timed after its layer's dense time
    was stored is scaled by the stored dense time over the one measured beside it, so that every
    stored rank keeps the ratio it was measured at (interleaved runs).
    ``lowrank_compress.io.timings`` reads and writes the JSON file; ``reused`` and ``measured``
    count this run's lookups that were stored before and the entries it added.
    """

    FORMAT = "lrc-timing-cache"
    VERSION = 1

    def __init__(self, entries: dict[str, float] | None = None):
        self.entries: dict[str, float] = dict(entries or {})
        self._loaded = frozenset(self.entries)
        self._used: set[str] = set()
        self.measured = 0

    def get(self, key: str) -> float | None:
        value = self.entries.get(key)
        if value is not None:
            self._used.add(key)
        return value

    def put(self, key: str, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"a measured time must be finite and positive, got {seconds!r}")
        if key not in self.entries:
            self.measured += 1
        self.entries[key] = float(seconds)

    @property
    def reused(self) -> int:
        return len(self._used & self._loaded)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "version": self.VERSION, "entries": dict(sorted(self.entries.items()))}

    @classmethod
    def from_dict(cls, data: Any, where: str = "timing cache") -> TimingCache:
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise UsageError(f"{where} is not an lrc timing cache (no \"format\": \"{cls.FORMAT}\")")
        if data.get("version") != cls.VERSION:
            raise UsageError(f"{where} has timing-cache version {data.get('version')!r}; this lrc reads {cls.VERSION}")
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise UsageError(f"{where}: \"entries\" must be an object of key → positive number")
        for key, value in entries.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise UsageError(f"{where}: entry {key[:80]!r} is not a positive number: {value!r}")
        return cls(entries)


class LayerTimer:
    """Times sites dense and factorized on the config's target at their real inputs.

    Each layer is run alone at its input captured from one forward pass of ``example_inputs``,
    batch expanded to each of ``config.latency_batch_size``. The factorized versions use random
    factors (time does not depend on the values). Dense and factorized runs of one layer are
    interleaved. Times go through ``cache`` (a fresh :class:`TimingCache` when None).
    """

    def __init__(self, model: nn.Module, sites: list[LayerSite], example_inputs: Any, config: CompressConfig,
                 cache: TimingCache | None = None):
        from .bench import runtime_fingerprint

        self.target = TARGETS[config.target]
        self.batches: tuple[int, ...] = config.latency_batch_size
        self.seed = config.seed
        self.inputs = _layer_inputs(model, sites, example_inputs)
        self.cache = TimingCache() if cache is None else cache
        self.fingerprint = runtime_fingerprint(self.target.runtime, self.target.device)

    def describe(self, dense: Times, factor: Times) -> str:
        return f"{self.target.name} " + "; ".join(
            f"batch {b}: dense {d * 1e3:.3f} ms, factorized {f * 1e3:.3f} ms ({f / d:.2f}×)"
            for b, d, f in zip(self.batches, dense, factor))

    @staticmethod
    def pays(dense: Times, factor: Times) -> bool:
        """Whether a factorization is below ``PAYS`` × dense at every timing batch size."""
        return all(f < PAYS * d for d, f in zip(dense, factor))

    def _key(self, site: LayerSite, x: torch.Tensor, batch: int, rank: int | None) -> str:
        layer = f"{type(site.module).__name__} {site.module!r} {str(site.module.weight.dtype).removeprefix('torch.')}"
        shape = "×".join(map(str, x.shape[1:]))
        return f"{self.fingerprint} | {layer} | input {shape} | batch {batch} | " + (
            "dense" if rank is None else f"rank {rank}")

    def times(self, site: LayerSite, ranks: list[int]) -> dict[int | None, Times]:
        """Seconds per call at each batch size, dense (key None) and at each rank; cached."""
        from .bench import layer_latencies

        x = self.inputs.get(site.name)
        if x is None:
            raise UsageError(f"layer {site.name} did not run on the example inputs; it cannot be timed")
        out: dict[int | None, list[float]] = {r: [] for r in [None, *ranks]}
        for batch in self.batches:
            keys = {r: self._key(site, x, batch, r) for r in out}
            todo = [r for r in ranks if self.cache.get(keys[r]) is None]
            dense = self.cache.get(keys[None])
            if todo or dense is None:
                gen = torch.Generator().manual_seed(self.seed)
                m, d = site.shape
                w = site.module.weight
                layers: dict[str, nn.Module] = {"dense": site.module}
                for r in todo:
                    probe = Factorization(torch.randn(m, r, generator=gen).to(w.dtype),
                                          torch.randn(r, d, generator=gen).to(w.dtype))
                    layers[str(r)] = from_dense(site.module, probe)
                measured = layer_latencies(layers, _at_batch(x, batch), self.target.runtime, self.target.device)
                scale = 1.0 if dense is None else dense / measured["dense"]
                if dense is None:
                    self.cache.put(keys[None], measured["dense"])
                for r in todo:
                    self.cache.put(keys[r], measured[str(r)] * scale)
            for r, key in keys.items():
                out[r].append(self.cache.entries[key])
        return {r: tuple(t) for r, t in out.items()}

    def model_ratios(self, model: nn.Module, sites: list[LayerSite], ranks: dict[str, int],
                     example_inputs: Any, dense_seconds: Times | None = None) -> Times:
        """Measured latency of ``model`` with ``ranks`` applied (random factors) / the dense model's,
        at each timing batch size.

        Both whole models are timed interleaved and, like the layers, by their fastest run, so
        that layer and model times are comparable on a loaded machine. ``dense_seconds`` (a lower
        bound of the dense model's time at each batch size, e.g. its planned layers' summed)
        raises the number of runs of a small model so that the pair is timed for about
        ``MODEL_SECONDS``: the fastest of ten runs of a 60 µs model moves by several percent.
        """
        from .bench import layer_latencies

        if not isinstance(example_inputs, torch.Tensor):
            raise UsageError("--target-latency times the whole model; it needs a single tensor input")
        planned = sorted((name, rank) for name, rank in ranks.items() if any(s.name == name for s in sites))
        structure = hashlib.sha256(f"{model!r} {planned}".encode()).hexdigest()[:16]
        keys = [f"{self.fingerprint} | model {structure} | input {'×'.join(map(str, example_inputs.shape[1:]))} "
                f"| batch {b} | compressed / dense" for b in self.batches]
        if all(self.cache.get(k) is not None for k in keys):
            return tuple(self.cache.entries[k] for k in keys)
        probe = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(self.seed)
        for site in sites:
            if site.name in ranks:
                m, d = site.shape
                old = probe.get_submodule(site.name)
                r = ranks[site.name]
                factors = Factorization(torch.randn(m, r, generator=gen), torch.randn(r, d, generator=gen))
                replace_module(probe, old, from_dense(old, factors.to(old.weight.dtype)))
        ratios = []
        for i, b in enumerate(self.batches):
            repeats = MODEL_REPEATS
            if dense_seconds is not None and dense_seconds[i] > 0:
                repeats = min(MODEL_MAX_REPEATS, max(MODEL_REPEATS, math.ceil(MODEL_SECONDS / dense_seconds[i])))
            times = layer_latencies({"dense": model, "compressed": probe}, _at_batch(example_inputs.detach(), b),
                                    self.target.runtime, self.target.device, repeats=repeats)
            ratios.append(times["compressed"] / times["dense"])
        for key, ratio in zip(keys, ratios):
            self.cache.put(key, ratio)
        return tuple(ratios)


def _at_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The first sample of ``x`` repeated to ``batch`` samples."""
    return x[:1].expand(batch, *x.shape[1:]).contiguous()


MODEL_REPEATS = 10
MODEL_MAX_REPEATS = 2000
MODEL_SECONDS = 0.2
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


def timed_budget_plan(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    curve_fn: Callable[[LayerSite, list[int]], list[float]],
    timing_cache: TimingCache | None = None,
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
    timer = LayerTimer(model, sites, example_inputs, config, timing_cache)
    positions = output_positions(model, sites, example_inputs)
    reasons, notes = {}, {}
    timed: dict[str, tuple[list[int], Times, list[Times]]] = {}  # ranks, dense, interpolated times
    for site in sites:
        ranks = site_ranks(site, config)
        if not ranks:
            reasons[site.name] = "no rank saves parameters"
            continue
        probes = _probe_ranks(ranks)
        times = timer.times(site, probes)
        per_batch = [np.interp(ranks, probes, [times[r][i] for r in probes]) for i in range(len(timer.batches))]
        timed[site.name] = (ranks, times[None], [tuple(float(t[j]) for t in per_batch) for j in range(len(ranks))])
    # One cost per rank across the batch sizes: each batch's time as a share of all planned layers'
    # dense time at that batch, averaged, in seconds at the first batch size (its own time when
    # there is one batch size), so that every batch size counts alike.
    totals = [sum(dense[i] for _, dense, _ in timed.values()) or 1.0 for i in range(len(timer.batches))]

    def combined(t: Times) -> float:
        return totals[0] * float(np.mean([v / total for v, total in zip(t, totals)]))

    curves = []
    saved_flops: dict[str, Callable[[int], float]] = {}
    layer_times: dict[str, tuple[Times, dict[int, Times]]] = {}
    for site in sites:
        if site.name not in timed:
            continue
        ranks, dense, costs = timed[site.name]
        paying = [(r, c) for r, c in zip(ranks, costs) if timer.pays(dense, c)]
        if not paying:
            fastest = min(costs, key=combined)
            reasons[site.name] = f"kept dense by latency-aware planning: {timer.describe(dense, fastest)}"
            continue
        kept = [r for r, _ in paying]
        layer_times[site.name] = (dense, dict(paying))
        curves.append(ErrorCurve(site.name, kept, [combined(c) for _, c in paying], curve_fn(site, kept),
                                 combined(dense)))
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
        savings = {c.name: combined(layer_times[c.name][0]) - combined(layer_times[c.name][1][ranks[c.name]])
                   for c in curves if c.name in ranks}
        ranks, ratio, checked = _never_slower(timer, model, sites, ranks, savings, example_inputs, totals)
        reasons.update(checked)
    else:
        # Layer times are short runs and the whole model a long one: on a loaded machine they are
        # not comparable in absolute terms, so the layers' time budget is a fraction g of their
        # dense time, and g is set from the measured whole-model ratio (a ratio of two long runs,
        # interleaved), starting at F and scaled by F / measured ratio.
        fraction, tried = config.target_latency, []
        for _ in range(LATENCY_CHECKS):
            allocation = allocate(curves, fraction * dense_layers)
            candidate = {name: r for name, r in allocation.items() if r is not None}
            measured = max(timer.model_ratios(model, sites, candidate, example_inputs, tuple(totals)))
            tried.append((measured, candidate))
            if config.target_latency - LATENCY_SLACK <= measured <= config.target_latency:
                break
            fraction = min(1.0, fraction * config.target_latency / measured)
        meeting = [t for t in tried if t[0] <= config.target_latency]
        ratio, ranks = max(meeting, key=lambda t: t[0]) if meeting else min(tried, key=lambda t: t[0])
    for curve in curves:
        dense, by_rank = layer_times[curve.name]
        if curve.name in reasons:  # taken back by the whole-model check
            continue
        if curve.name in ranks:
            note = f"factorized: {timer.describe(dense, by_rank[ranks[curve.name]])}"
            if ratio is not None:
                sizes = ", ".join(map(str, timer.batches))
                note += f"; whole model measured at {ratio:.2f}× dense (the worst of batch {sizes})"
            notes[curve.name] = note
        else:
            budget_name = "FLOPs" if config.target_flops is not None else "latency"
            fastest = min(by_rank.values(), key=combined)
            timing = timer.describe(dense, fastest).replace("factorized", "fastest factorized")
            reasons[curve.name] = f"kept dense by the {budget_name} budget allocation (timed on {timing})"
    return ranks, notes, reasons


def _never_slower(timer: LayerTimer, model: nn.Module, sites: list[LayerSite], ranks: dict[str, int],
                  savings: dict[str, float], example_inputs: Any,
                  dense_seconds: list[float]) -> tuple[dict[str, int], float | None, dict[str, str]]:
    """A FLOPs budget's plan checked as a whole: (ranks, worst measured ratio, reasons of the layers
    taken back).

    Layers timed alone can each pay and the whole model still not (a pair adds a kernel, and the
    graph fuses and lays out a lone layer differently). The planned model is timed against the
    dense one at every timing batch size; while it is not below ``FASTER`` × dense at all of them,
    the factorized layers that save the least measured time are kept dense, half of them at a
    time, until it is or none is left. Inputs that are not a single tensor skip the check (ratio
    None).
    """
    if not ranks or not isinstance(example_inputs, torch.Tensor):
        return ranks, None, {}
    taken_back: dict[str, str] = {}
    least_first = sorted(ranks, key=lambda name: savings[name])
    while ranks:
        ratios = timer.model_ratios(model, sites, ranks, example_inputs, tuple(dense_seconds))
        worst = max(ratios)
        if worst < FASTER:
            return ranks, worst, taken_back
        measured = ", ".join(f"batch {b} {r:.2f}×" for b, r in zip(timer.batches, ratios))
        layers = f"{len(ranks)} layer{'s' if len(ranks) > 1 else ''}"
        drop = least_first[: max(1, (len(least_first) + 1) // 2)]
        least_first = least_first[len(drop):]
        for name in drop:
            del ranks[name]
            taken_back[name] = (f"kept dense by the whole-model check: with {layers} factorized the model "
                                f"measured {measured} the dense model's time on {timer.target.name}; this layer "
                                f"saved the least measured time")
    return ranks, None, taken_back
