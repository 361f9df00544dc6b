"""Pointwise activations the projection knows, by name.

An activation is named by a string: ``relu``, ``gelu``, ``silu``, ``hardswish``, ``sigmoid``,
``tanh``, ``relu6``, ``hardsigmoid``, ``mish``, ``elu``, ``identity`` or ``leaky_relu`` with an
optional slope, ``leaky_relu(0.2)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS = (
    "identity", "relu", "leaky_relu", "gelu", "silu", "hardswish", "sigmoid", "tanh",
    "relu6", "hardsigmoid", "mish", "elu",
)

_LEAKY = re.compile(r"^leaky_relu(?:\(([-+0-9.eE]+)\))?$")


def canonical_activation(name: str) -> str:
    """Return the canonical spelling of ``name`` or raise ``ValueError`` for an unknown one."""
    if not isinstance(name, str):
        raise ValueError(f"activation must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    aliases = {"swish": "silu", "none": "identity", "linear": "identity", "hard_swish": "hardswish"}
    key = aliases.get(key, key)
    match = _LEAKY.match(key)
    if match:
        slope = float(match.group(1)) if match.group(1) else 0.01
        return "leaky_relu" if slope == 0.01 else f"leaky_relu({slope:g})"
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return key


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise function for an activation name."""
    key = canonical_activation(name)
    match = _LEAKY.match(key)
    if match:
        slope = float(match.group(1)) if match.group(1) else 0.01
        return lambda z: F.leaky_relu(z, slope)
    return {
        "identity": lambda z: z,
        "relu": torch.relu,
        "gelu": F.gelu,
        "silu": F.silu,
        "hardswish": F.hardswish,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu6": F.relu6,
        # F.hardsigmoid has no double backward, which the per-row Newton fit needs; same values.
        "hardsigmoid": lambda z: (z / 6.0 + 0.5).clamp(0.0, 1.0),
        "mish": F.mish,
        "elu": F.elu,
    }[key]
