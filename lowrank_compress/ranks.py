"""Per-layer rank policies: the deployment targets, candidate ranks, and one uniform policy per layer.

For a layer with flattened weight W (m, d):
- ``rank N``: r = N, capped at the layer's max useful rank, the largest r with r·(m+d) < m·d.
- ``rank_ratio F``: r = round(F · min(m, d)) (the paper's "rank scale").
- ``param_ratio F``: the layer keeps F of its own weights: r = floor(F · m·d/(m+d)).
Every rank is at least 1; ``round_to N`` rounds to a multiple of N. Without ``round_to`` the speed
budgets (``target_flops``, ``target_latency``) round to the target's multiple (:data:`TARGETS`; a small
layer whose max useful rank is below twice that multiple takes half of it, and so on).
A layer is skipped, with the reason, when its rank would not save parameters (r·(m+d) ≥ m·d).
The budgets across layers are planned in :mod:`lowrank_compress.plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import CompressConfig
from .graph import LayerSite
from .modelrun import forward_with_hooks


@dataclass(frozen=True)
class Target:
    """A deployment runtime and device: where layers are timed and the rank multiple that suits it."""

    name: str
    runtime: str  # "onnxruntime" or "torch"
    device: str  # "cpu" or "cuda"
    rank_multiple: int


TARGETS = {
    # onnxruntime's fast CPU convolutions run in its blocked NCHWc layout: blocks of 16 channels with
    # AVX-512, 8 with AVX2. A rank off the block takes the pair out of the layout (reorders, lost fusions).
    "onnxruntime-cpu": Target("onnxruntime-cpu", "onnxruntime", "cpu", 16),
    # oneDNN's blocked layouts: 16 channels with AVX-512.
    "torch-cpu": Target("torch-cpu", "torch", "cpu", 16),
    # Tensor cores take bf16/fp16 matrix dimensions in multiples of 8.
    "torch-cuda": Target("torch-cuda", "torch", "cuda", 8),
    "onnxruntime-cuda": Target("onnxruntime-cuda", "onnxruntime", "cuda", 8),
}
# The speed budgets round ranks to the target's multiple; a parameter budget is about size, where
# rounding a narrow layer's rank to 16 costs accuracy and saves nothing (the digits CNN at
# --target-params 0.1 lost 3 points to it).
_BUDGETS = ("target_flops", "target_latency")


def rank_multiple(config: CompressConfig) -> int:
    """What ranks are rounded to: ``round_to``, else the target's multiple for budgets, else 1."""
    if config.round_to is not None:
        return config.round_to
    return TARGETS[config.target].rank_multiple if config.policy in _BUDGETS else 1


def _site_multiple(max_rank: int, multiple: int, explicit: bool) -> int:
    """The multiple for one layer: a target's multiple halves until the layer has two of them."""
    while not explicit and multiple > 1 and max_rank < 2 * multiple:
        multiple //= 2
    return multiple


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


def output_positions(model: nn.Module, sites: list[LayerSite], example_inputs: Any) -> dict[str, int]:
    """Per site, output positions per forward (spatial size for convs, tokens for Linear)."""
    positions: dict[str, int] = {}

    def hook(name: str, m: int):
        def record(_module, _inputs, output):
            positions[name] = positions.get(name, 0) + output.numel() // m

        return record

    forward_with_hooks(model, [(s.module, hook(s.name, s.shape[0])) for s in sites], example_inputs)
    return positions



def _rank_grid(max_rank: int, round_to: int, points: int = 24) -> list[int]:
    """Candidate ranks from 1 (or round_to) to max_rank, denser at small ranks."""
    grid = {max(1, int(round(max_rank ** (i / (points - 1))))) for i in range(points)}
    grid |= {max(1, int(round(max_rank * i / (points - 1)))) for i in range(1, points)}
    if round_to > 1:
        grid = {(r // round_to) * round_to for r in grid if r >= round_to}
    return sorted(r for r in grid if 1 <= r <= max_rank)


def site_ranks(site: LayerSite, config: CompressConfig, multiple: int | None = None) -> list[int]:
    """Candidate ranks of a site under a budget: rounded as the target wants (or to ``multiple``),
    each saving parameters."""
    m, d = site.shape
    if multiple is None:
        multiple = _site_multiple(site.max_useful_rank, rank_multiple(config), config.round_to is not None)
    return [r for r in _rank_grid(site.max_useful_rank, multiple) if saves_parameters(r, m, d)]


def may_add_bias(site: LayerSite, method: str, calibrated: bool = False) -> bool:
    """Whether factorizing may give a bias-free layer a bias (calibrated candidates all fit one)."""
    if site.module.bias is not None:
        return False
    return calibrated or (method == "nkp" and (site.bn_before is not None or site.activation != "identity"))

