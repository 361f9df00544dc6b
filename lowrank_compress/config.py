"""What to compress and how (the config), and what came out (the reports)."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import UsageError
from .methods import method_names
from .sensitivity import OUTPUT_METRICS

CONFIG_VERSION = 1
ALLOCATIONS = ("auto", "output", "layer")
_POLICIES = ("rank", "rank_ratio", "param_ratio", "target_params", "target_flops", "target_latency")
# Where the compressed model will run: sets the rank rounding and the runtime latency-aware planning
# times layers on (see ranks.TARGETS).
TARGETS = ("onnxruntime-cpu", "torch-cpu", "torch-cuda", "onnxruntime-cuda")
DEFAULT_TARGET = "onnxruntime-cpu"
# Batch sizes latency-aware planning times layers at: a factorization must pay at every one of them,
# since a pair that is faster at batch 1 can be slower at batch 16 (and the other way round).
DEFAULT_LATENCY_BATCHES = (1, 16)


@dataclass
class CompressConfig:
    """What to compress and how. Exactly one rank policy must be set (see :mod:`plan`).

    ``include`` / ``exclude`` are regular expressions searched in layer names. ``calibration``
    switches on the data-aware projection (an iterable of model inputs); ``refine_steps`` applies
    to it.

    ``target`` is the runtime and device the model is deployed to; it sets the rank rounding of the
    budget policies (``round_to`` None) and where latency-aware planning times layers.
    ``latency_aware`` None: on with a ``target_flops`` or ``target_latency`` budget, off otherwise.
    ``target_latency`` F: the compressed model's measured latency on ``target`` is at most F × dense.
    ``distill_steps`` None: the automatic schedule of :func:`lowrank_compress.distill.auto_schedule`
    (with calibration only); 0 turns distillation off. ``distill_lr``: its Adam step relative to
    each factor's RMS (None or ``"auto"``: chosen by :func:`lowrank_compress.distill.choose_lr`, a
    short probe of each candidate on the held-out check). ``block_steps``: Adam
    steps per block of the joint refinement of its factors against the original block (with
    calibration only; 0 off).
    """

    method: str = "nkp"
    rank: int | None = None
    rank_ratio: float | None = None
    param_ratio: float | None = None
    target_params: float | None = None
    target_flops: float | None = None
    target_latency: float | None = None
    include: str | None = None
    exclude: str | None = None
    round_to: int | None = None
    refine_steps: int = 200
    calib_samples: int = 256
    target: str = DEFAULT_TARGET
    latency_aware: bool | None = None
    latency_batch_size: int | tuple[int, ...] | str = DEFAULT_LATENCY_BATCHES
    allocation: str = "auto"
    output_metric: str = "auto"
    block_steps: int = 200
    blocks: str | None = None
    distill_steps: int | None = None
    distill_features: float = 0.0
    distill_lr: float | str | None = None
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**63:  # torch seeds are 64-bit
            raise UsageError(f"--seed must be an integer in [0, 2^63), got {self.seed}")
        if self.method not in method_names(data_free=True):
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(method_names(data_free=True))}")
        chosen = [p for p in _POLICIES if getattr(self, p) is not None]
        if len(chosen) != 1:
            flags = ", ".join("--" + p.replace("_", "-") for p in _POLICIES)
            what = "none" if not chosen else " and ".join("--" + p.replace("_", "-") for p in chosen)
            raise UsageError(f"give exactly one rank policy ({flags}); got {what}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise UsageError(f"--rank must be a positive integer, got {self.rank!r}")
        for name in ("rank_ratio", "param_ratio", "target_params", "target_flops", "target_latency"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1 and math.isfinite(value)):
                raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {value!r}")
        if self.round_to is not None and (
                isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1):
            raise UsageError(f"--round-to must be a positive integer, got {self.round_to!r}")
        if self.refine_steps < 0:
            raise UsageError(f"--refine-steps must be ≥ 0, got {self.refine_steps}")
        if self.target not in TARGETS:
            raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.latency_aware not in (None, True, False):
            raise UsageError(f"latency_aware must be True, False or None (auto), got {self.latency_aware!r}")
        if self.target_latency is not None and self.latency_aware is False:
            raise UsageError("--target-latency allocates by measured layer times; it cannot run with --no-latency-aware")
        self.latency_batch_size = _batch_sizes(self.latency_batch_size)
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.output_metric not in OUTPUT_METRICS:
            raise UsageError(f"--output-metric must be one of {', '.join(OUTPUT_METRICS)}, got {self.output_metric!r}")
        for name in ("block_steps", "distill_steps"):
            value = getattr(self, name)
            if name == "distill_steps" and value is None:
                continue  # automatic schedule
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer ≥ 0, got {value!r}")
        if not isinstance(self.distill_features, (int, float)) or not 0 <= self.distill_features < math.inf:
            raise UsageError(f"--distill-features must be a weight ≥ 0, got {self.distill_features!r}")
        if self.distill_lr not in (None, "auto") and not (
                isinstance(self.distill_lr, (int, float)) and not isinstance(self.distill_lr, bool)
                and 0 < self.distill_lr < math.inf):
            raise UsageError(f"--distill-lr must be a positive number or 'auto', got {self.distill_lr!r}")
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

    @property
    def times_layers(self) -> bool:
        """Whether planning times layers on the target (``latency_aware``, None resolved)."""
        if self.latency_aware is not None:
            return self.latency_aware
        return self.target_flops is not None or self.target_latency is not None

    def to_dict(self) -> dict[str, Any]:
        return {"_type": "CompressConfig", "_version": self.version, "_data": asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressConfig:
        if data.get("_type") != "CompressConfig":
            raise UsageError(f"not a CompressConfig: {data.get('_type')!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.get("_data", {}).items() if k in known})


def _batch_sizes(value: Any) -> tuple[int, ...]:
    """``latency_batch_size`` as sorted distinct batch sizes: an int, a sequence of ints, or
    comma-separated text such as ``"1,16"``."""
    items = value.replace(" ", "").split(",") if isinstance(value, str) else (
        [value] if isinstance(value, numbers.Integral) else value)
    try:
        sizes = tuple(sorted({int(v) for v in items if v != ""}))
    except (TypeError, ValueError):
        raise UsageError(f"--latency-batch-size must be positive integers such as 1 or 1,16, got {value!r}") from None
    if not sizes or any(isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) for v in items) \
            or sizes[0] < 1:
        raise UsageError(f"--latency-batch-size must be positive integers such as 1 or 1,16, got {value!r}")
    return sizes


@dataclass
class LayerReport:
    """One factorized layer.

    ``error_spectral`` / ``error_nkp``: relative expected post-activation error under Gaussian
    inputs (docs/design.md §2) of the two data-free factorizations at this rank. ``candidates``: with
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
    # With network-aware calibration: the layer's output sensitivity (Σ over its channels) and the
    # predicted output-metric cost of its factorization at this rank.
    output_sensitivity: float | None = None
    predicted_cost: float | None = None
    # {"spectral"/"nkp": {"ranks": [...], "errors": [...]}}: Gaussian-input error vs rank, filled
    # only by compress(..., curves=True) since it costs about as much as a data-free compression.
    curves: dict[str, dict[str, list]] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """A layer left dense, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    """The recipe a compressed file records beside its tensors (the ``lrc`` metadata key).

    ``compress`` fills in the method, policy and input shape; ``io.format.save`` adds the arch, the
    layer table and the versions. A field is None where nothing says; ``extra`` keeps the fields
    this lrc does not know, as read. ``to_dict`` gives the manifest's JSON object.
    """

    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    input_shape: list[int] | None = None
    method: str | None = None
    policy: dict[str, Any] | None = None
    data_config: dict[str, Any] | None = None
    hf: dict[str, Any] | None = None
    dtype: str | None = None
    layers: dict[str, dict[str, Any]] | None = None
    format_version: int | None = None
    lrc_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Manifest:
        return cls().updated(**values)

    def updated(self, **values: Any) -> Manifest:
        """This manifest with ``values`` set (unknown keys go to ``extra``)."""
        known = {f.name for f in fields(self)} - {"extra"}
        extra = {**self.extra, **{k: v for k, v in values.items() if k not in known}}
        return replace(self, extra=extra, **{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, then ``extra``."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in own.items() if v is not None}, **self.extra}


@dataclass
class CompressReport:
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    layers: list[LayerReport]
    skipped: list[Skip]
    config: dict[str, Any]
    output_error: float | None = None
    notes: list[str] = field(default_factory=list)
    output_metric: str | None = None
    predicted_output_cost: float | None = None
    measured_output_cost: float | None = None
    blocks: list[dict[str, Any]] = field(default_factory=list)
    distillation: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage (not in to_dict)
    # With a timing cache: how many layer timings it supplied and how many were measured (not in to_dict).
    timings: dict[str, int] | None = None
    manifest: Manifest | None = None  # what the compression recorded for the file (not in to_dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "output_error": self.output_error,
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "config": self.config,
            "notes": list(self.notes),
            "output_metric": self.output_metric,
            "predicted_output_cost": self.predicted_output_cost,
            "measured_output_cost": self.measured_output_cost,
            "blocks": list(self.blocks),
            "distillation": self.distillation,
        }  # without ``seconds`` (the same command writes a byte-identical report) and ``manifest``



ProgressFn = Callable[[str, int, int], None]
