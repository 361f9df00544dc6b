"""Factorizations and the checks every factorization routine makes on its inputs.

A weight W has shape (m, d) (conv weights (m, C/groups, k...) are flattened to m × (C/groups·k...));
a factorization is W ≈ A B with A: (m, r), B: (r, d) and an output bias of shape (m,).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

# A weight with at least this many elements is never copied whole to float64 (a 16384² layer would
# take 2 GiB more): the randomized SVD reads it in float32 and row-wise float64 quantities are
# computed over blocks of at least BLOCK_ELEMENTS. At 32 MiB and up, glibc gives each block its own
# mapping and returns it on free; smaller blocks come from the heap, which then grows with
# fragmentation (a 16384² layer peaked at 4.1 GB with 16 MiB blocks and 2.8 GB with 32 MiB ones).
LARGE_WEIGHT = 50_000_000
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Factorization:
    """W ≈ A @ B (+ bias): A (m, r), B (r, d), bias (m,) or None."""

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def product(self) -> torch.Tensor:
        """The dense (m, d) matrix A @ B."""
        return self.A @ self.B

    def to(self, dtype: torch.dtype) -> Factorization:
        bias = None if self.bias is None else self.bias.to(dtype)
        return Factorization(self.A.to(dtype), self.B.to(dtype), bias)


def flatten_weight(weight: torch.Tensor) -> torch.Tensor:
    """(m, ...) → (m, d): a conv weight (m, C/g, k...) becomes m × (C/g·k...)."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a tensor, got {type(weight).__name__}")
    if weight.ndim < 2:
        raise ValueError(f"weight must be at least 2-D (m, d, ...), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:  # checked first: reshape(0, -1) itself fails
        raise ValueError(f"weight has an empty dimension: shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def check_finite(name: str, t: torch.Tensor | None) -> None:
    # In chunks: isfinite on a whole 16384² weight allocates 1.75 GiB of temporaries.
    if t is not None and not all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(BLOCK_ELEMENTS)):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_rank(rank: int, m: int, d: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"rank must be an integer, got {rank!r}")
    if rank < 1 or rank > min(m, d):
        raise ValueError(f"rank {rank} is outside [1, {min(m, d)}] for a {m}×{d} weight")
    return int(rank)


def check_bias(bias: torch.Tensor | None, m: int) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.shape != (m,):
        raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
    check_finite("bias", bias)
    return bias.to(torch.float64)


def check_row_weights(row_weights: torch.Tensor | None, m: int) -> torch.Tensor | None:
    if row_weights is None:
        return None
    if row_weights.shape != (m,):
        raise ValueError(f"row_weights must have shape ({m},), got {tuple(row_weights.shape)}")
    if not torch.isfinite(row_weights).all() or (row_weights < 0).any():
        raise ValueError("row_weights must be finite and non-negative")
    return row_weights.to(torch.float64)


def row_blocks(w: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, those rows of w (m, d) in float64): one block unless w has LARGE_WEIGHT elements."""
    m, d = w.shape
    step = m if w.numel() < LARGE_WEIGHT else -(-BLOCK_ELEMENTS // max(d, 1))
    for start in range(0, m, step):
        rows = slice(start, min(start + step, m))
        yield rows, w[rows].to(torch.float64)


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """Row norms of w (m, d), float64, (m,)."""
    return torch.cat([block.norm(dim=1) for _, block in row_blocks(w)])
