"""Typed records that travel between reading a model and using it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class LoadedModel:
    """A model with what is known about how to rebuild and feed it."""

    model: nn.Module
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    arch_note: str | None = None  # how the architecture was found when no spec named it
    hf: Any = None  # io.hf.HFModel: a Hugging Face model's config, inputs and tokenizer
