"""Calibration-aware projection: keep a pretrained model's function at low rank.

For each layer, in execution order:
1. its inputs x̃ come from the model *as compressed so far* while its targets σ(z) come from the
   original model at the same positions (asymmetric reconstruction, Zhang et al. 2015);
2. streaming float64 statistics of the pre-activation responses z̃ = W x̃ + b (mean μ, covariance
   Σ, m×m — never the d×d input covariance) and a bounded reservoir of (input patch, target) pairs;
3. candidates — every registered method (:mod:`lowrank_compress.methods`): spectral, data-free
   nkp, the calibrated response-space projection with a bounded per-row Gaussian (scale, bias)
   fit, …; the spectral start and the best other start are then refined by guarded Adam on the
   post-activation error;
4. the candidate with the lowest held-out post-activation error is kept (never worse than SVD on
   the held-out samples, since spectral is always a candidate).

Network-aware (the default, ``allocation="output"``): before any layer is replaced, gradient
probes of the original model give each layer's per-channel output sensitivity (the row weights of
steps 2–4) and its predicted output cost at every rank (the curves of the rank allocation), see
:mod:`lowrank_compress.outputcost`. After the last layer of a block is fitted, the block's factors
are refined jointly (:mod:`lowrank_compress.blocks`), and ``distill_steps`` of label-free
distillation finish the job (:mod:`lowrank_compress.distill`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .activations import activation_fn
from .blocks import Block, find_blocks, first_tensor, reconstruct_block
from .config import CompressConfig, LayerReport, ProgressFn, Skip
from .distill import DistillReport, auto_schedule, batch_size_for, distill
from .errors import UsageError
from .graph import LayerSite
from .latencyplan import TimingCache
from .layers import from_dense
from .losses import split_held_out
from .methods import factor_params, unfold_batchnorm
from .modelrun import (batch_size, call_model, count_flops, float_batch, forward_with_hooks, model_device,
                       model_dtype, output_tensors, padding_mask, replace_module, slice_batch)
from .outputcost import output_cost_curves, row_weights, site_sensitivities
from .plan import Plan, plan_ranks
from .responses import ResponseStats, patches, real_rows, responses, stats_error_curve
from .candidates import candidates, choose_candidate
from .layerinputs import LayerInputs, called_once, modules_called_once
from .sensitivity import channel_sensitivities, detect_output_metric, output_metric

RESERVOIR = 2048  # (input patch, target) pairs kept per layer: 3/4 for refinement, 1/4 held out


# ---------------------------------------------------------------- original-model pass


@dataclass
class _Targets:
    positions: list[torch.Tensor]  # per batch: indices into that batch's response rows
    post: torch.Tensor  # (P, m) targets σ(z) at the reservoir positions
    stats: ResponseStats  # of the original responses (for rank allocation)


def _original_pass(original: nn.Module, sites: list[LayerSite], batches: list[Any], seed: int) -> dict[str, _Targets]:
    """One pass over the original model: reservoir positions, targets and response statistics."""
    gen = torch.Generator().manual_seed(seed + 7)
    # Each batch's share of the reservoir follows its real samples (tokens, when padded), so that
    # batches of short texts are not over-represented.
    weights = [int(mask.sum()) if (mask := padding_mask(b)) is not None else batch_size(b) for b in batches]
    total = max(sum(weights), 1)
    shares = [max(1, -(-RESERVOIR * w // total)) for w in weights]
    modules = {s.name: original.get_submodule(s.name) for s in sites}
    acc = {s.name: ([], [], ResponseStats.empty(s.shape[0])) for s in sites}
    fns = {s.name: activation_fn(s.activation) for s in sites}

    called: set[str] = set()
    current: dict[str, Any] = {"mask": None, "batch": 0}

    def hook(site: LayerSite):
        def record(_m, _inputs, output):
            # A module called several times per forward (shared) is calibrated on its first call,
            # the one the compressed pass stops at.
            if site.name in called:
                return
            called.add(site.name)
            rows = real_rows(site, responses(site, output.detach().to(torch.float32)), output, current["mask"])
            positions, post, stats = acc[site.name]
            stats.update(rows)
            idx = torch.randperm(rows.shape[0], generator=gen)[:shares[current["batch"]]].sort().values
            positions.append(idx)
            post.append(fns[site.name](rows[idx]))

        return record

    handles = [modules[s.name].register_forward_hook(hook(s)) for s in sites]
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                called.clear()
                current["mask"], current["batch"] = padding_mask(batch), i
                call_model(original, batch)
    finally:
        for h in handles:
            h.remove()
    return {name: _Targets(p, torch.cat(t), st) for name, (p, t, st) in acc.items()}


# ---------------------------------------------------------------- the calibrated job


def probe_batches(batches: list[Any], samples: int = 64) -> list[Any]:
    """The first ``samples`` calibration samples, for the gradient probes."""
    out, seen = [], 0
    for batch in batches:
        if seen >= samples:
            break
        take = min(batch_size(batch), samples - seen)
        out.append(slice_batch(batch, slice(0, take)))
        seen += take
    return out


def _micro_batches(batches: list[Any], size: int = 8) -> list[Any]:
    """The calibration batches re-split into batches of ``size`` samples (for block training)."""
    out = []
    for batch in batches:
        n = batch_size(batch)
        out += [slice_batch(batch, slice(i, i + size)) for i in range(0, n, size)]
    return out


def holdout_split(batches: list[Any]) -> tuple[list[Any], list[Any]]:
    """The calibration samples in batches of the distillation's size (:func:`distill.batch_size_for`),
    split into (train, held out): every fourth batch is held out (the last one, also trained on,
    when there are fewer than four). Block reconstruction and distillation share it."""
    return split_held_out(_micro_batches(batches, batch_size_for(sum(batch_size(b) for b in batches))))


@dataclass
class CalibrationState:
    """What planning learned from the calibration data, reused when the plan is carried out."""

    original: nn.Module
    batches: list[Any]
    targets: dict[str, _Targets]
    metric: str
    sensitivities: dict[str, torch.Tensor]
    costs: dict[str, torch.Tensor]  # per site, predicted output cost at rank r = 0..m
    plan: Plan
    seconds: dict[str, float]  # wall time of each planning stage


class _Clock:
    """Wall time per named stage (stages that repeat add up)."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds = {} if seconds is None else seconds
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self.last, 2)
        self.last = now


def prepare_calibrated(model: nn.Module, sites: list[LayerSite], config: CompressConfig, example_inputs: Any,
                       batches: list[Any], timing_cache: TimingCache | None = None) -> tuple[CalibrationState, Plan]:
    """Statistics, output probes and the rank plan; ``model`` is not changed."""
    import copy

    if not batches:
        raise UsageError("the calibration data is empty")
    clock = _Clock()
    original = copy.deepcopy(model).eval()
    targets = _original_pass(original, sites, batches, config.seed)
    clock.lap("statistics")
    metric = config.output_metric
    if metric == "auto":
        metric = detect_output_metric(original, batches[0])
    sens: dict[str, torch.Tensor] = {}
    costs: dict[str, torch.Tensor] = {}
    if config.allocation != "layer":
        # Backward passes keep every activation: batches of 8 bound the memory of the probes. They run
        # in float32: half-precision gradients underflow, and the plan would follow the rounding.
        probe = _micro_batches(probe_batches(batches), 8)
        prober = original
        if model_dtype(original) != torch.float32:
            prober = copy.deepcopy(original).float()
            probe = [float_batch(b, torch.float32) for b in probe]
        sens = site_sensitivities(prober, sites, probe, metric, config.seed)
        clock.lap("sensitivities")
        alphas = {s.name: row_weights(s, sens.get(s.name)) for s in sites}
        costs = output_cost_curves(prober, sites, probe, metric, {n: t.stats for n, t in targets.items()},
                                   alphas, config.seed)
        clock.lap("cost_curves")
        del prober

    def curve(site: LayerSite, ranks: list[int]) -> list[float]:
        if site.name in costs:
            return [float(costs[site.name][min(r, site.shape[0])]) for r in ranks]
        return stats_error_curve(site, targets[site.name].stats, ranks)

    ranks, notes, reasons = plan_ranks(model, sites, config, example_inputs, curve, calibrated=True,
                                       timing_cache=timing_cache)
    predicted = {n: float(costs[n][min(r, len(costs[n]) - 1)]) for n, r in ranks.items() if n in costs}
    the_plan = Plan.from_ranks(sites, ranks, notes, reasons, config.method, predicted,
                               metric if config.allocation != "layer" else None)
    clock.lap("plan")
    return CalibrationState(original, batches, targets, metric, sens, costs, the_plan, clock.seconds), the_plan


def calibrated_compress(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    calibration: Iterable[Any],
    progress: ProgressFn | None = None,
    asymmetric: bool = True,
    observer: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
    swaps: Any = None,
    timing_cache: TimingCache | None = None,
    distill_inputs: Iterable[Any] | None = None,
) -> tuple[list[LayerReport], list[Skip], dict[str, Any]]:
    """Compress ``sites`` of ``model`` in place with calibration data (see the module docstring).

    ``asymmetric=False`` calibrates every layer on the original model's inputs instead (for
    comparison; the asymmetric default is what works). ``observer(name, inputs, targets)`` sees
    each layer's reservoir: input rows (P, d) and target rows σ(z) (P, m). ``swaps`` records the
    replacements (:class:`lowrank_compress.compress.ModuleSwaps`) so that a caller can undo them.
    ``distill_inputs``: distillation's ``stream`` (:func:`lowrank_compress.distill.distill`).
    Returns the layer reports, the skipped layers and the run-level report fields.
    """
    state, the_plan = prepare_calibrated(model, sites, config, example_inputs, list(calibration), timing_cache)
    clock = _Clock(dict(state.seconds))
    original, batches, targets, metric, sens = state.original, state.batches, state.targets, state.metric, \
        state.sensitivities
    by_name = {s.name: s for s in sites}
    ranks = the_plan.ranks
    entries = {e.name: e for e in the_plan.entries}
    skipped = [Skip(e.name, e.reason) for e in the_plan.entries if e.rank is None]
    todo = [s for s in sites if s.name in ranks]
    reports: list[LayerReport] = []
    source = model if asymmetric else original
    once = called_once(source, todo, batches[0])
    runner = LayerInputs(source, batches, once)
    # Joint training runs in float32 models only: Adam steps in half precision drift.
    trainable = asymmetric and model_dtype(model) == torch.float32
    blocks = _blocks(model, todo, batches[0], once, config) if config.block_steps > 0 and trainable else []
    block_of_last = {b.sites[-1]: b for b in blocks}
    block_sens = (_block_sensitivities(original, blocks, _micro_batches(probe_batches(batches), 8), metric, config.seed)
                  if blocks else {})
    # Blocks and distillation hold out the same samples: a sample one of them trained on would
    # make the other's held-out check favour its start.
    train_split, held_split = holdout_split(batches)
    micro = (_micro_batches(train_split), _micro_batches(held_split)) if blocks else ([], [])
    block_reports = []
    clock.lap("blocks")
    for i, site in enumerate(todo):
        if progress is not None:
            progress(site.name, i, len(todo))
        target = targets[site.name]
        stats = ResponseStats.empty(site.shape[0])
        inputs: list[torch.Tensor] = []
        module = site.module if asymmetric else original.get_submodule(site.name)

        def capture(b: int, x: torch.Tensor, output: torch.Tensor, site=site, stats=stats, inputs=inputs, target=target) -> None:
            mask = padding_mask(batches[b])
            stats.update(real_rows(site, responses(site, output.detach().to(torch.float32)), output, mask))
            rows = real_rows(site, patches(site, x.detach().to(torch.float32)), output, mask)
            inputs.append(rows[target.positions[b]])

        runner.run(site.name, module, capture)
        x_all = torch.cat(inputs)
        y_all = target.post
        if observer is not None:
            observer(site.name, x_all, y_all)
        gen = torch.Generator().manual_seed(config.seed + i)
        perm = torch.randperm(x_all.shape[0], generator=gen)
        held = max(1, x_all.shape[0] // 4)
        h_idx, t_idx = perm[:held], perm[held:] if x_all.shape[0] > 1 else perm
        alpha = row_weights(by_name[site.name], sens.get(site.name))
        cands, errors, gaussian = candidates(
            by_name[site.name], ranks[site.name], stats, x_all[t_idx], y_all[t_idx], x_all[h_idx], y_all[h_idx],
            config.refine_steps, config.seed + i, alpha=alpha, method=config.method,
        )
        best = choose_candidate(errors, config.method)
        module_factors = unfold_batchnorm(site, cands[best]).to(site.module.weight.dtype)
        new = from_dense(site.module, module_factors)
        if swaps is not None:
            swaps.replace(site.module, new)
        else:
            replace_module(model, site.module, new)
        reports.append(LayerReport(
            name=site.name, kind=site.kind, activation=site.activation, shape=list(site.shape), rank=ranks[site.name],
            params_before=site.params,
            params_after=factor_params(site, ranks[site.name], module_factors.bias is not None),
            error_spectral=gaussian["spectral"], error_nkp=gaussian["nkp"], method=best,
            note=entries[site.name].note, candidates=errors,
            output_sensitivity=float(sens[site.name].sum()) if site.name in sens else None,
            predicted_cost=entries[site.name].predicted_cost,
            curves=_cost_curve(state.costs.get(site.name), ranks[site.name]),
        ))
        clock.lap("fits")
        block = block_of_last.get(site.name)
        if block is not None:
            if progress is not None:
                progress(f"block {block.name}", i, len(todo))
            block_reports.append(reconstruct_block(
                model, original, block, micro[0], block_sens[block.name], config.block_steps, seed=config.seed + i,
                held_out=micro[1]))
            clock.lap("blocks")
    distilled = None
    if config.distill_steps != 0 and todo and trainable:
        distilled = _distill(model, original, batches, (train_split, held_split), blocks, todo, once, metric, config,
                             progress, distill_inputs)
        clock.lap("distillation")
    if progress is not None:
        progress("done", len(todo), len(todo))
    extra = {
        "output_metric": metric,
        "predicted_output_cost": the_plan.predicted_output_cost,
        "measured_output_cost": measured_output_metric(original, model, probe_batches(batches), metric),
        "blocks": [asdict(b) for b in block_reports],
        "distillation": None if distilled is None else asdict(distilled),
    }
    clock.lap("measure")
    extra["seconds"] = clock.seconds
    return reports, skipped, extra


def _distill(model: nn.Module, original: nn.Module, batches: list[Any], split: tuple[list[Any], list[Any]],
             blocks: list[Block], todo: list[LayerSite], once: set[str], metric: str, config: CompressConfig,
             progress: ProgressFn | None, stream: Iterable[Any] | None = None) -> DistillReport:
    """Label-free distillation after the fits, for the requested or the automatic number of steps."""
    samples = sum(batch_size(b) for b in batches)
    sample_flops = 0.0  # only the automatic schedule reads it: two counting passes saved otherwise
    if config.distill_steps is None:
        one = slice_batch(batches[0], slice(0, 1))
        sample_flops = count_flops(original, one) + 3 * count_flops(model, one)
    device = model_device(model).type
    schedule = auto_schedule(samples, sample_flops, device, config.distill_steps, fresh=stream is not None)
    if progress is not None:
        progress("distillation", len(todo), len(todo))
    features = {}
    if config.distill_features > 0:
        found = blocks or _blocks(model, todo, batches[0], once, config)
        features = {b.name: b.channels_last for b in found}
    train, held = split
    report = distill(model, original, train, metric, schedule.steps, seed=config.seed, features=features,
                     lr="auto" if config.distill_lr is None else config.distill_lr,
                     feature_weight=config.distill_features, held_out=held, stream=stream)
    report.schedule = schedule.reason
    return report


def _cost_curve(costs: torch.Tensor | None, rank: int, points: int = 12) -> dict[str, dict[str, list]]:
    """A layer's predicted output cost at log-spaced ranks and the chosen one, for reports and plots."""
    if costs is None:
        return {}
    top = len(costs) - 1
    ranks = sorted({max(1, round(top ** (i / (points - 1)))) for i in range(points)} | {rank})
    return {"output_cost": {"ranks": ranks, "costs": [float(costs[r]) for r in ranks]}}


def measured_output_metric(original: nn.Module, model: nn.Module, batches: list[Any], metric: str) -> float:
    """The output metric (KL or relative MSE) of ``model`` against ``original`` on ``batches``."""
    num, den = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            n, d = output_metric(output_tensors(call_model(original, batch)), output_tensors(call_model(model, batch)),
                                 metric, padding_mask(batch))
            num, den = num + n, den + d
    return num / den if den > 0 else 0.0


def _blocks(model: nn.Module, sites: list[LayerSite], batch: Any, once: set[str], config: CompressConfig) -> list[Block]:
    """The blocks of :mod:`lowrank_compress.blocks` among modules that run once and return a tensor."""
    names = [n for n, _ in model.named_modules() if n]
    tensor_out: set[str] = set()

    def record(name: str):
        def hook(_m, _inputs, output):
            if first_tensor(output) is not None:
                tensor_out.add(name)

        return hook

    forward_with_hooks(model, [(model.get_submodule(n), record(n)) for n in names], batch)
    all_once = modules_called_once(model, set(names), batch) | once
    conv1d = {s.name for s in sites if isinstance(s.module, nn.Conv1d)}
    return find_blocks(model, [s.name for s in sites], all_once, tensor_out, conv1d, config.blocks)


def _block_sensitivities(original: nn.Module, blocks: list[Block], batches: list[Any], metric: str,
                         seed: int) -> dict[str, torch.Tensor]:
    targets = {b.name: original.get_submodule(b.name) for b in blocks}
    last = {b.name: b.channels_last for b in blocks}
    return channel_sensitivities(original, targets, batches, metric, lambda n: last[n], seed=seed, draws=2)
