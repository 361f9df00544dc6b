"""What several commands share: option help texts."""

from __future__ import annotations

ARCH_HELP = "Architecture of a state-dict checkpoint: torchvision:NAME, timm:NAME or package.module:callable."
