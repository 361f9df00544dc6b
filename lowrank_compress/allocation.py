"""Budgeted rank allocation: spend a parameter (or FLOP) budget where it buys the most accuracy.

Each layer offers a curve of (rank, cost, error) points, plus staying dense (full cost, no error).
Starting from every layer at its cheapest point, the greedy step moves the layer whose next point
buys the largest error reduction per unit of cost (looking ahead past flat stretches, so curves need
not be convex) until the budget is spent.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass
class ErrorCurve:
    """Error of one layer at candidate ranks; ``dense_cost`` is the cost of keeping it dense."""

    name: str
    ranks: list[int]
    costs: list[float]
    errors: list[float]
    dense_cost: float

    def options(self) -> list[tuple[float, float, int | None]]:
        """(cost, error, rank) points by increasing cost; rank None is the dense layer."""
        points = sorted(zip(self.costs, self.errors, self.ranks))
        return [(c, e, r) for c, e, r in points if c < self.dense_cost] + [(self.dense_cost, 0.0, None)]


def _best_jump(options: list[tuple[float, float, int | None]], at: int) -> tuple[float, int] | None:
    """The next point with the best error drop per cost from ``at``: (gain per cost, index)."""
    cost, err, _ = options[at]
    best = None
    for j in range(at + 1, len(options)):
        dc = options[j][0] - cost
        gain = (err - options[j][1]) / dc if dc > 0 else float("inf")
        if best is None or gain > best[0]:
            best = (gain, j)
    return best


def allocate(curves: list[ErrorCurve], budget: float, fixed_cost: float = 0.0) -> dict[str, int | None]:
    """Choose a rank per layer (None: keep dense) so that fixed_cost + Σ cost ≤ budget.

    ``fixed_cost`` is what the layers outside the curves cost (they stay as they are). If even the
    cheapest point of every layer exceeds the budget, the cheapest points are returned.
    """
    options = {c.name: c.options() for c in curves}
    at = {name: 0 for name in options}
    spent = fixed_cost + sum(opts[0][0] for opts in options.values())
    heap: list[tuple[float, str, int]] = []
    for name, opts in options.items():
        jump = _best_jump(opts, 0)
        if jump is not None:
            heapq.heappush(heap, (-jump[0], name, jump[1]))
    while heap:
        neg_gain, name, target = heapq.heappop(heap)
        opts = options[name]
        extra = opts[target][0] - opts[at[name]][0]
        if spent + extra > budget:
            # Too expensive: try the cheapest further step of this layer that still fits.
            fits = [j for j in range(at[name] + 1, len(opts)) if spent + opts[j][0] - opts[at[name]][0] <= budget]
            if not fits:
                continue
            cost, err, _ = opts[at[name]]
            target = max(fits, key=lambda j: (err - opts[j][1]) / max(opts[j][0] - cost, 1e-12))
            extra = opts[target][0] - cost
            if opts[target][1] >= err:
                continue
        spent += extra
        at[name] = target
        jump = _best_jump(opts, target)
        if jump is not None:
            heapq.heappush(heap, (-jump[0], name, jump[1]))
    return {name: options[name][i][2] for name, i in at.items()}
