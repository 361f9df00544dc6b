"""Training configuration and recipes: YAML files of ``lrc finetune`` defaults.

:class:`TrainConfig` holds the hyperparameters of a run (this module does not import torch, so the
CLI can show its defaults cheaply). A recipe maps option names (the CLI's long flags with ``_`` for
``-``) to values: every field of :class:`TrainConfig`, the model keys of :data:`MODEL_KEYS`, and
``base_batch``. Values given on the command line override the recipe's. An unknown key or a value
of the wrong type is an error naming the key; a recipe read and written back reads the same.

Batch scaling (the linear rule of Goyal et al. 2017): a recipe with ``base_batch`` states its ``lr``
and ``warmup_steps`` for a global batch of ``base_batch`` images. A run with global batch B uses

    lr = lr_recipe × B / base_batch        warmup_steps = round(warmup_steps_recipe × base_batch / B)

so the learning rate per image and the number of warm-up *images* stay the same. An ``--lr`` or
``--warmup-steps`` given on the command line is used as given, without scaling.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError
from .io.files import atomic_output

OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (the recipe-able options of ``lrc finetune``).

    Units: ``lr`` is the peak learning rate reached after ``warmup_steps`` optimizer steps of linear
    warm-up; a cosine decay then takes it to 0 at the last step of ``epochs``. ``batch_size`` is the
    global batch (images per step over all ranks). ``checkpoint_every`` and ``log_every`` count
    optimizer steps. ``max_steps`` stops the run after that many steps in total (the schedule still
    spans ``epochs``): for time-boxed jobs.
    """

    epochs: int = 1
    batch_size: int = 256
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    frobenius_decay: float = 0.0
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    kd_temperature: float = 1.0
    kd_weight: float = 0.5
    clip_grad: float | None = None
    ema: float | None = None
    workers: int = 4
    seed: int = 0
    checkpoint_every: int | None = None
    log_every: int = 20
    max_steps: int | None = None
    min_crop_scale: float = 0.08
    hflip: float = 0.5
    precision: str = "auto"
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "log_every": self.log_every}
        for name in ("checkpoint_every", "max_steps"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        non_negative = ("weight_decay", "frobenius_decay", "momentum", "label_smoothing", "kd_weight", "hflip",
                        "warmup_steps", "workers")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.label_smoothing >= 1 or self.kd_weight > 1 or self.hflip > 1:
            raise UsageError("--label-smoothing must be < 1, and --kd-weight and --hflip at most 1")
        if self.kd_temperature <= 0:
            raise UsageError(f"--kd-temperature must be positive, got {self.kd_temperature}")
        if not 0 < self.min_crop_scale <= 1:
            raise UsageError(f"--min-crop-scale must be in (0, 1], got {self.min_crop_scale}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise UsageError(f"--clip-grad must be positive, got {self.clip_grad}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise UsageError(f"--ema is a decay in (0, 1), got {self.ema}")
        if not 0 <= self.seed < 2**63:  # torch seeds are 64-bit
            raise UsageError(f"--seed must be an integer in [0, 2^63), got {self.seed}")


# Keys that choose the model for ``--from-scratch`` runs; their CLI flags have the same names.
MODEL_KEYS: dict[str, type] = {
    "from_scratch": bool,
    "arch": str,
    "arch_kwargs": dict,
    "input_shape": list,
    "method": str,
    "rank": int,
    "rank_ratio": float,
    "param_ratio": float,
}


def _train_key_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    types: dict[str, type] = {}
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        types[f.name] = args[0] if args else hint
    return types


def recipe_keys() -> dict[str, type]:
    """Every key a recipe may hold, with its value type."""
    return {**_train_key_types(), **MODEL_KEYS, "base_batch": int}


def _check_value(key: str, value: Any, expected: type, source: str) -> Any:
    if value is None:
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        if is_int or isinstance(value, float):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is int:
        if is_int:
            return value
    elif expected is list:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
    elif isinstance(value, expected):
        return value
    what = "a list of integers" if expected is list else expected.__name__
    raise UsageError(f"{source}: {key} must be {what}, got {value!r}")


def validate_recipe(values: dict[str, Any], source: str = "recipe") -> dict[str, Any]:
    """Check keys and value types; returns the values with floats normalized. Unknown keys are errors."""
    if not isinstance(values, dict):
        raise UsageError(f"{source} must be a mapping of option names to values")
    known = recipe_keys()
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise UsageError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        checked[key] = _check_value(key, value, known[key], source)
    base = checked.get("base_batch")
    if base is not None and base < 1:
        raise UsageError(f"{source}: base_batch must be positive, got {base}")
    return checked


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no recipe file {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML ({' '.join(str(exc).split())[:160]})") from None
    return validate_recipe(values or {}, str(path))


def dump_recipe(values: dict[str, Any], path: str | Path) -> None:
    """Write a validated recipe as YAML (keys in the given order), atomically."""
    checked = validate_recipe(values)
    with atomic_output(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(checked, sort_keys=False))


def resolve_options(recipe: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """Merge recipe defaults with explicit options (None = not given) and apply the batch rule.

    Returns the merged values without ``base_batch``; see the module docstring for the rule.
    """
    given = {k: v for k, v in explicit.items() if v is not None}
    values = {**recipe, **given}
    base = values.pop("base_batch", None)
    batch = values.get("batch_size")
    if base is not None and batch is not None:
        if "lr" not in given and recipe.get("lr") is not None:
            values["lr"] = recipe["lr"] * batch / base
        if "warmup_steps" not in given and recipe.get("warmup_steps") is not None:
            values["warmup_steps"] = round(recipe["warmup_steps"] * base / batch)
    return values
