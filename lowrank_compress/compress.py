"""Compress a model: find layer sites, plan ranks, project, swap in factorized layers.

``plan`` checks everything and changes nothing; ``compress`` plans, then replaces layers. Any error
after the first replacement puts every original layer back, so a failure leaves the model as it was.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .activations import canonical_activation
from .calibration import calibrated_compress, prepare_calibrated
from .config import CompressConfig, CompressReport, LayerReport, Manifest, ProgressFn, Skip
from .errors import UsageError
from .graph import LayerSite, find_sites
from .io.format import keep_manifest, manifest_of
from .io.timings import load_timing_cache, save_timing_cache
from .latencyplan import TimingCache
from .layers import from_dense
from .methods import FitProblem, factor_params, get_method, unfold_batchnorm
from .modelrun import count_flops, count_params, replace_module
from .plan import Plan, PlanEntry, plan_ranks
from .factors import Factorization, check_finite
from .gaussian import function_error
from .projection import error_curve, factorize_all

__all__ = ["CompressConfig", "CompressReport", "LayerReport", "ModuleSwaps", "compress", "count_flops",
           "count_params", "plan"]


class ModuleSwaps:
    """Module replacements made so far, undone in reverse order by :meth:`undo`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.done: list[tuple[nn.Module, nn.Module]] = []

    def replace(self, old: nn.Module, new: nn.Module) -> None:
        replace_module(self.model, old, new)
        self.done.append((old, new))

    def undo(self) -> None:
        for old, new in reversed(self.done):
            replace_module(self.model, new, old)
        self.done.clear()


def _data_free(site: LayerSite, rank: int, method: str) -> tuple[Factorization, LayerReport]:
    w, b = site.effective_weight()
    alpha = site.row_weights()
    act = canonical_activation(site.activation)
    both = factorize_all(w, rank, act, b, alpha)
    if method not in both:
        both[method] = get_method(method).fit(FitProblem(site, rank, w, b, act, alpha))
    errors = {k: function_error(w, b, f, act, alpha, relative=True) for k, f in both.items()}
    factors = unfold_batchnorm(site, both[method])
    params_after = factor_params(site, rank, factors.bias is not None or site.module.bias is not None)
    report = LayerReport(
        name=site.name, kind=site.kind, activation=site.activation, shape=list(site.shape), rank=rank,
        params_before=site.params, params_after=params_after, error_spectral=errors["spectral"],
        error_nkp=errors["nkp"], method=method, candidates=errors,
    )
    return factors, report


def error_curves(site: LayerSite, rank: int, points: int = 12) -> dict[str, dict[str, list]]:
    """Relative Gaussian-input error vs rank of spectral and nkp for one site, for plots.

    ``points`` ranks from 1 to the max useful rank, log-spaced (plots show rank on a log axis),
    plus the chosen ``rank``.
    """
    w, b = site.effective_weight()
    top = site.max_useful_rank
    ranks = sorted({max(1, round(top ** (i / (points - 1)))) for i in range(points)} | {rank})
    return {
        method: {"ranks": ranks, "errors": error_curve(w, ranks, method, site.activation, b, site.row_weights())}
        for method in ("spectral", "nkp")
    }



def _select(sites: list[LayerSite], config: CompressConfig) -> tuple[list[LayerSite], list[Skip]]:
    chosen, skipped = [], []
    for site in sites:
        if not site.eligible:
            skipped.append(Skip(site.name, site.skip_reason))
        elif config.include is not None and not re.search(config.include, site.name):
            skipped.append(Skip(site.name, "not matched by --include"))
        elif config.exclude is not None and re.search(config.exclude, site.name):
            skipped.append(Skip(site.name, "matched by --exclude"))
        else:
            chosen.append(site)
    return chosen, skipped


def _example_shape(example_inputs: Any) -> list[int] | None:
    return list(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else None


TimingCacheLike = TimingCache | str | os.PathLike | None


def _timing_cache(timing_cache: TimingCacheLike) -> tuple[TimingCache | None, Path | None]:
    """The cache to plan with, and the file to write it back to (a path is read first)."""
    if timing_cache is None or isinstance(timing_cache, TimingCache):
        return timing_cache, None
    return load_timing_cache(timing_cache), Path(timing_cache)


def plan(model: nn.Module, config: CompressConfig, example_inputs: Any,
         calibration: Iterable[Any] | None = None, timing_cache: TimingCacheLike = None) -> Plan:
    """What :func:`compress` would do to each layer (rank or reason, method, predicted output cost).

    Checks the model, the config and the calibration data; changes nothing. ``timing_cache``: as
    for :func:`compress`.
    """
    model.eval()
    cache, cache_path = _timing_cache(timing_cache)
    sites = find_sites(model, example_inputs)
    chosen, skipped = _select(sites, config)
    _check_finite(chosen)
    if calibration is not None:
        _, the_plan = prepare_calibrated(model, chosen, config, example_inputs, list(calibration), cache)
    else:
        ranks, notes, reasons = plan_ranks(model, chosen, config, example_inputs, timing_cache=cache)
        the_plan = Plan.from_ranks(chosen, ranks, notes, reasons, config.method)
    the_plan.entries += [PlanEntry(s.name, None, config.method, reason=s.reason) for s in skipped]
    if cache_path is not None:
        save_timing_cache(cache, cache_path)
    return the_plan


def _check_finite(sites: list[LayerSite]) -> None:
    for site in sites:
        for what, tensor in (("weights", site.module.weight), ("bias", site.module.bias)):
            try:
                check_finite(what, None if tensor is None else tensor.detach())
            except ValueError:
                raise UsageError(f"layer {site.name} has NaN or Inf {what}; nothing was changed") from None


def compress(
    model: nn.Module,
    config: CompressConfig,
    example_inputs: Any,
    calibration: Iterable[Any] | None = None,
    progress: ProgressFn | None = None,
    curves: bool = False,
    timing_cache: TimingCacheLike = None,
    distill_inputs: Iterable[Any] | None = None,
) -> tuple[nn.Module, CompressReport]:
    """Replace the eligible Linear/Conv layers of ``model`` (in place) by factorized layers.

    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) is used
    to trace the model. Without ``calibration`` the projection is data-free (Gaussian inputs); with
    it, the layers are calibrated in order on the compressed model's own activations
    (see :mod:`lowrank_compress.calibration`). ``progress(stage, done, total)`` is called per layer.
    ``curves=True`` also records each layer's error-vs-rank curves in the report (for
    :func:`lowrank_compress.plots.plot_compression`). ``timing_cache`` (a :class:`TimingCache` or
    the path of its JSON file, read when it exists and written back after a successful run) keeps
    latency-aware planning's layer timings, so that running again reuses them and plans the same.
    ``distill_inputs`` (with ``calibration``): an iterable of new input batches for the label-free
    distillation to train on instead of flipped and mixed-up calibration inputs, such as a
    DataLoader with a training transform; it is iterated again when it ends (a one-shot iterator
    that runs out ends the steps), and its first batches are the held-out check. Fresh inputs generalize better than copies of a few
    (:mod:`lowrank_compress.distill`). Returns the same model object and a report.
    """
    if distill_inputs is not None and calibration is None:
        raise UsageError("distill_inputs are for the distillation of a calibrated compression; pass calibration too")
    model.eval()
    cache, cache_path = _timing_cache(timing_cache)
    with torch.no_grad():
        params_before = count_params(model)
        flops_before = count_flops(model, example_inputs)
    sites = find_sites(model, example_inputs)
    chosen, skipped = _select(sites, config)
    _check_finite(chosen)
    notes = sorted({n for s in sites for n in s.notes if n.startswith("tracing failed")})
    swaps = ModuleSwaps(model)
    try:
        if calibration is not None:
            layer_reports, more_skipped, extra = calibrated_compress(
                model, chosen, config, example_inputs, calibration, progress, swaps=swaps, timing_cache=cache,
                distill_inputs=distill_inputs)
        else:
            layer_reports, more_skipped = _compress_data_free(model, chosen, config, example_inputs, progress, swaps,
                                                              cache)
            extra = {}
        if cache_path is not None:
            save_timing_cache(cache, cache_path)
    except BaseException:
        swaps.undo()
        raise
    skipped.extend(more_skipped)
    if curves:
        by_name = {s.name: s for s in chosen}
        for layer in layer_reports:
            layer.curves.update(error_curves(by_name[layer.name], layer.rank))

    with torch.no_grad():
        params_after = count_params(model)
        flops_after = count_flops(model, example_inputs)
    manifest = (manifest_of(model) or Manifest()).updated(
        method=config.method, policy={config.policy: getattr(config, config.policy)})
    if _example_shape(example_inputs) is not None:
        manifest = manifest.updated(input_shape=_example_shape(example_inputs))
    keep_manifest(model, manifest)  # beside the model, for a later io.format.save(model, path)
    report = CompressReport(
        params_before=params_before, params_after=params_after, flops_before=flops_before, flops_after=flops_after,
        layers=layer_reports, skipped=skipped, config=config.to_dict(), notes=notes, manifest=manifest, **extra,
    )
    if cache is not None:
        report.timings = {"reused": cache.reused, "measured": cache.measured}
    return model, report


def _compress_data_free(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    progress: ProgressFn | None,
    swaps: ModuleSwaps,
    timing_cache: TimingCache | None = None,
) -> tuple[list[LayerReport], list[Skip]]:
    ranks, notes, reasons = plan_ranks(model, sites, config, example_inputs, timing_cache=timing_cache)
    skipped = [Skip(n, r) for n, r in reasons.items()]
    todo = [s for s in sites if s.name in ranks]
    reports = []
    for i, site in enumerate(todo):
        if progress is not None:
            progress(site.name, i, len(todo))
        factors, report = _data_free(site, ranks[site.name], config.method)
        report.note = notes.get(site.name)
        swaps.replace(site.module, from_dense(site.module, factors))
        reports.append(report)
    if progress is not None:
        progress("done", len(todo), len(todo))
    return reports, skipped
