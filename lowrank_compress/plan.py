"""Rank policies: how many ranks each layer keeps (DESIGN.md §4).

For a layer with flattened weight W (m, d):
- ``rank N``: r = N, capped at the layer's max useful rank, the largest r with r·(m+d) < m·d.
- ``rank_ratio F``: r = round(F · min(m, d)) (the paper's "rank scale").
- ``param_ratio F``: the layer keeps F of its own weights: r = floor(F · m·d/(m+d)).
- ``target_params F`` / ``target_flops F``: the whole model keeps at most F of its parameters
  (or FLOPs); ranks are allocated across layers by measured error reduction per parameter
  (or FLOP) — see :mod:`lowrank_compress.allocation`.
Every rank is at least 1; ``round_to N`` rounds to a multiple of N. A layer is skipped, with the
reason, when its rank would not save parameters (r·(m+d) ≥ m·d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .graph import LayerSite


@dataclass
class RankChoice:
    """The rank chosen for a site, or why it is left dense."""

    rank: int | None
    note: str | None = None
    skip_reason: str | None = None


def saves_parameters(rank: int, m: int, d: int, extra: int = 0) -> bool:
    """Whether rank-r factors (plus ``extra`` parameters, e.g. a newly fitted bias) beat m·d."""
    return rank * (m + d) + extra < m * d


def round_rank(rank: int, multiple: int, max_rank: int) -> int:
    """Round to the nearest multiple of ``multiple``, never above ``max_rank`` (0 if none fits)."""
    if multiple <= 1:
        return rank
    rounded = max(multiple, int(round(rank / multiple)) * multiple)
    while rounded > max_rank and rounded > 0:
        rounded -= multiple
    return rounded


def choose_rank(
    site: LayerSite,
    rank: int | None = None,
    rank_ratio: float | None = None,
    param_ratio: float | None = None,
    round_to: int = 1,
    extra_params: int = 0,
) -> RankChoice:
    """Apply one uniform policy (rank, rank_ratio or param_ratio) to one site.

    ``extra_params``: what the factorized layer may gain besides its factors (a bias fitted for a
    bias-free layer), so that a capped rank still saves parameters.
    """
    m, d = site.shape
    max_rank = max(0, min(site.max_useful_rank, (m * d - extra_params - 1) // (m + d)))
    note = None
    if rank is not None:
        r = rank
        if r > max_rank:
            note = f"rank {rank} capped at the max useful rank {max_rank}"
            r = max_rank
    elif rank_ratio is not None:
        r = max(1, int(round(rank_ratio * min(m, d))))
    elif param_ratio is not None:
        r = max(1, math.floor(param_ratio * m * d / (m + d)))
    else:
        raise ValueError("no rank policy given")
    if round_to > 1:
        rounded = round_rank(r, round_to, max_rank)
        if rounded < 1:
            return RankChoice(None, skip_reason=f"no multiple of {round_to} below the max useful rank {max_rank}")
        if rounded != r:
            note = f"rank {r} rounded to {rounded}"
        r = rounded
    if r < 1 or not saves_parameters(r, m, d, extra_params):
        return RankChoice(None, skip_reason=f"rank {r} would not save parameters (max useful rank {max_rank})")
    return RankChoice(r, note=note)
