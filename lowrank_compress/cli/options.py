"""What several commands share: option help texts and small checks of parsed options."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError

ARCH_HELP = "Architecture of a state-dict checkpoint: torchvision:NAME, timm:NAME or package.module:callable."


def require_input_shape(loaded_shape: tuple[int, ...] | None, given: tuple[int, ...] | None, path: Path) -> tuple[int, ...]:
    """The shape to run ``path``'s model at: the one given, else the one the file records; a usage error without."""
    shape = given or loaded_shape
    if shape is None:
        raise UsageError(f"cannot tell the input shape of {path}; pass --input-shape, e.g. 1,3,224,224")
    return tuple(shape)
