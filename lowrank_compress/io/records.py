"""Typed records that travel between reading a model and using it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import nn

from ..config import Manifest


@dataclass(frozen=True)
class DataConfig:
    """How a model's images are prepared: input size (C, H, W), mean, std, interpolation, crop_pct.

    A field is None where nothing says; ``data.complete_data_config`` fills every one in. As read
    from a file or an arch's config (values as they came; ``to_dict`` gives back the keys that are set).
    """

    input_size: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DataConfig:
        """From a dict of the known keys (a manifest's ``data_config``); other keys are ignored."""
        values = values or {}
        return cls(**{f.name: tuple(v) if isinstance(v := values[f.name], list) else v
                      for f in fields(cls) if values.get(f.name) is not None})

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def updated(self, other: DataConfig) -> DataConfig:
        """This config with every field that ``other`` sets taken from ``other``."""
        return replace(self, **other.to_dict())


@dataclass
class LoadedModel:
    """A model with what is known about how to rebuild and feed it."""

    model: nn.Module
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    data_config: DataConfig = field(default_factory=DataConfig)
    manifest: Manifest | None = None  # a compressed file's (io.format)
    metadata: dict[str, str] = field(default_factory=dict)
    arch_note: str | None = None  # how the architecture was found when no spec named it
    hf: Any = None  # io.hf.HFModel: a Hugging Face model's config, inputs and tokenizer
