"""Compress a model: find layer sites, choose ranks, project, swap in factorized layers."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .activations import canonical_activation
from .allocation import ErrorCurve, allocate
from .errors import UsageError
from .graph import LayerSite, find_sites
from .layers import from_dense
from .plan import choose_rank, saves_parameters
from .sensitivity import OUTPUT_METRICS
from .projection import METHODS, Factorization, error_curve, factorize_all, function_error

CONFIG_VERSION = 1
ALLOCATIONS = ("auto", "output", "layer")
_POLICIES = ("rank", "rank_ratio", "param_ratio", "target_params", "target_flops")


@dataclass
class CompressConfig:
    """What to compress and how. Exactly one rank policy must be set (see :mod:`plan`).

    ``include`` / ``exclude`` are regular expressions searched in layer names. ``calibration``
    switches on the data-aware projection (an iterable of model inputs); ``refine_steps`` applies
    to it.
    """

    method: str = "nkp"
    rank: int | None = None
    rank_ratio: float | None = None
    param_ratio: float | None = None
    target_params: float | None = None
    target_flops: float | None = None
    include: str | None = None
    exclude: str | None = None
    round_to: int = 1
    refine_steps: int = 200
    calib_samples: int = 256
    latency_aware: bool = False
    latency_runtime: str = "torch"
    latency_batch_size: int = 1
    allocation: str = "auto"
    output_metric: str = "auto"
    block_steps: int = 200
    blocks: str | None = None
    distill_steps: int = 0
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        chosen = [p for p in _POLICIES if getattr(self, p) is not None]
        if len(chosen) != 1:
            flags = ", ".join("--" + p.replace("_", "-") for p in _POLICIES)
            what = "none" if not chosen else " and ".join("--" + p.replace("_", "-") for p in chosen)
            raise UsageError(f"give exactly one rank policy ({flags}); got {what}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise UsageError(f"--rank must be a positive integer, got {self.rank!r}")
        for name in ("rank_ratio", "param_ratio", "target_params", "target_flops"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1 and math.isfinite(value)):
                raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {value!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise UsageError(f"--round-to must be a positive integer, got {self.round_to!r}")
        if self.refine_steps < 0:
            raise UsageError(f"--refine-steps must be ≥ 0, got {self.refine_steps}")
        if self.latency_runtime not in ("torch", "onnxruntime"):
            raise UsageError(f"--latency-runtime must be torch or onnxruntime, got {self.latency_runtime!r}")
        if self.latency_batch_size < 1:
            raise UsageError(f"--latency-batch-size must be ≥ 1, got {self.latency_batch_size}")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.output_metric not in OUTPUT_METRICS:
            raise UsageError(f"--output-metric must be one of {', '.join(OUTPUT_METRICS)}, got {self.output_metric!r}")
        for name in ("block_steps", "distill_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer ≥ 0, got {value!r}")
        if self.calib_samples < 1:
            raise UsageError(f"--calib-samples must be ≥ 1, got {self.calib_samples}")
        for name in ("include", "exclude", "blocks"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UsageError(f"bad --{name} regex {pattern!r}: {exc}") from None

    @property
    def policy(self) -> str:
        return next(p for p in _POLICIES if getattr(self, p) is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"_type": "CompressConfig", "_version": self.version, "_data": asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressConfig:
        if data.get("_type") != "CompressConfig":
            raise UsageError(f"not a CompressConfig: {data.get('_type')!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.get("_data", {}).items() if k in known})


@dataclass
class LayerReport:
    """One factorized layer.

    ``error_spectral`` / ``error_nkp``: relative expected post-activation error under Gaussian
    inputs (DESIGN.md §2) of the two data-free factorizations at this rank. ``candidates``: with
    calibration, each candidate's relative post-activation error on held-out calibration samples
    (``method`` names the one kept); without, the Gaussian errors again.
    """

    name: str
    kind: str
    activation: str
    shape: list[int]
    rank: int
    params_before: int
    params_after: int
    error_spectral: float
    error_nkp: float
    method: str
    note: str | None = None
    candidates: dict[str, float] = field(default_factory=dict)
    # {"spectral"/"nkp": {"ranks": [...], "errors": [...]}}: Gaussian-input error vs rank, filled
    # only by compress(..., curves=True) since it costs about as much as a data-free compression.
    curves: dict[str, dict[str, list]] = field(default_factory=dict)


@dataclass
class CompressReport:
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    layers: list[LayerReport]
    skipped: list[dict[str, str]]
    config: dict[str, Any]
    output_error: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "output_error": self.output_error,
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": list(self.skipped),
            "config": self.config,
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------- counting


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, shared tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one forward pass at ``example_inputs`` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _call(model, example_inputs)
    return int(counter.get_total_flops())


def _forward_with_hooks(model: nn.Module, hooks: list[tuple[nn.Module, Callable]], example_inputs: Any) -> None:
    """One forward pass without gradients with forward hooks attached, removed afterwards."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()


def _output_positions(model: nn.Module, sites: list[LayerSite], example_inputs: Any) -> dict[str, int]:
    """Per site, output positions per forward (spatial size for convs, tokens for Linear)."""
    positions: dict[str, int] = {}

    def hook(name: str, m: int):
        def record(_module, _inputs, output):
            positions[name] = positions.get(name, 0) + output.numel() // m

        return record

    _forward_with_hooks(model, [(s.module, hook(s.name, s.shape[0])) for s in sites], example_inputs)
    return positions


# ---------------------------------------------------------------- per-layer projection


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


def _factor_params(site: LayerSite, rank: int, has_bias: bool) -> int:
    m, d = site.shape
    return rank * (m + d) + (m if has_bias else 0)


def _data_free(site: LayerSite, rank: int, method: str) -> tuple[Factorization, LayerReport]:
    w, b = site.effective_weight()
    alpha = site.row_weights()
    act = canonical_activation(site.activation)
    both = factorize_all(w, rank, act, b, alpha)
    errors = {k: function_error(w, b, f, act, alpha, relative=True) for k, f in both.items()}
    factors = unfold_batchnorm(site, both[method])
    params_after = _factor_params(site, rank, factors.bias is not None or site.module.bias is not None)
    report = LayerReport(
        name=site.name, kind=site.kind, activation=site.activation, shape=list(site.shape), rank=rank,
        params_before=site.params, params_after=params_after, error_spectral=errors["spectral"],
        error_nkp=errors["nkp"], method=method, candidates=errors,
    )
    return factors, report


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


def _gaussian_curve(method: str) -> Callable[[LayerSite, list[int]], list[float]]:
    def curve(site: LayerSite, ranks: list[int]) -> list[float]:
        w, b = site.effective_weight()
        return error_curve(w, ranks, method, site.activation, b, site.row_weights(), fit=False)

    return curve


# ---------------------------------------------------------------- surgery


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Replace every occurrence of ``old`` (shared modules included) by ``new``; returns the names."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return names


def _select(sites: list[LayerSite], config: CompressConfig) -> tuple[list[LayerSite], list[dict[str, str]]]:
    chosen, skipped = [], []
    for site in sites:
        if not site.eligible:
            skipped.append({"name": site.name, "reason": site.skip_reason})
        elif config.include is not None and not re.search(config.include, site.name):
            skipped.append({"name": site.name, "reason": "not matched by --include"})
        elif config.exclude is not None and re.search(config.exclude, site.name):
            skipped.append({"name": site.name, "reason": "matched by --exclude"})
        else:
            chosen.append(site)
    return chosen, skipped


def _example_shape(example_inputs: Any) -> list[int] | None:
    return list(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else None


ProgressFn = Callable[[str, int, int], None]


def compress(
    model: nn.Module,
    config: CompressConfig,
    example_inputs: Any,
    calibration: Iterable[Any] | None = None,
    progress: ProgressFn | None = None,
    curves: bool = False,
) -> tuple[nn.Module, CompressReport]:
    """Replace the eligible Linear/Conv layers of ``model`` (in place) by factorized layers.

    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) is used
    to trace the model. Without ``calibration`` the projection is data-free (Gaussian inputs); with
    it, the layers are calibrated in order on the compressed model's own activations
    (see :mod:`lowrank_compress.calibration`). ``progress(stage, done, total)`` is called per layer.
    ``curves=True`` also records each layer's error-vs-rank curves in the report (for
    :func:`lowrank_compress.plots.plot_compression`). Returns the same model object and a report.
    """
    model.eval()
    with torch.no_grad():
        params_before = count_params(model)
        flops_before = count_flops(model, example_inputs)
    sites = find_sites(model, example_inputs)
    chosen, skipped = _select(sites, config)
    notes = sorted({n for s in sites for n in s.notes if n.startswith("tracing failed")})

    if calibration is not None:
        from .calibration import calibrated_compress

        layer_reports, more_skipped = calibrated_compress(model, chosen, config, example_inputs, calibration, progress)
        skipped.extend(more_skipped)
    else:
        layer_reports, more_skipped = _compress_data_free(model, chosen, config, example_inputs, progress)
        skipped.extend(more_skipped)
    if curves:
        by_name = {s.name: s for s in chosen}
        for layer in layer_reports:
            layer.curves = error_curves(by_name[layer.name], layer.rank)

    with torch.no_grad():
        params_after = count_params(model)
        flops_after = count_flops(model, example_inputs)
    manifest = dict(getattr(model, "lrc_manifest", None) or {})
    manifest.update(method=config.method, policy={config.policy: getattr(config, config.policy)})
    if _example_shape(example_inputs) is not None:
        manifest["input_shape"] = _example_shape(example_inputs)
    model.lrc_manifest = manifest
    report = CompressReport(
        params_before=params_before, params_after=params_after, flops_before=flops_before, flops_after=flops_after,
        layers=layer_reports, skipped=skipped, config=config.to_dict(), notes=notes,
    )
    return model, report


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

    _forward_with_hooks(model, [(s.module, hook(s.name)) for s in sites], example_inputs)
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


def _compress_data_free(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    progress: ProgressFn | None,
) -> tuple[list[LayerReport], list[dict[str, str]]]:
    ranks, notes, reasons = plan_ranks(model, sites, config, example_inputs)
    skipped = [{"name": n, "reason": r} for n, r in reasons.items()]
    todo = [s for s in sites if s.name in ranks]
    reports = []
    for i, site in enumerate(todo):
        if progress is not None:
            progress(site.name, i, len(todo))
        factors, report = _data_free(site, ranks[site.name], config.method)
        report.note = notes.get(site.name)
        replace_module(model, site.module, from_dense(site.module, factors))
        reports.append(report)
    if progress is not None:
        progress("done", len(todo), len(todo))
    return reports, skipped
