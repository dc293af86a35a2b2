"""Pareto frontier of quality against cost."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(costs: Sequence[float], qualities: Sequence[float], higher_is_better: bool = True) -> list[bool]:
    """For each point, whether no other point is at least as cheap and at least as good, and strictly
    better in one of the two."""
    sign = 1 if higher_is_better else -1
    points = [(c, sign * q) for c, q in zip(costs, qualities)]
    on_front = []
    for i, (c, q) in enumerate(points):
        dominated = any(
            (c2 <= c and q2 >= q) and (c2 < c or q2 > q) for j, (c2, q2) in enumerate(points) if j != i
        )
        on_front.append(not dominated)
    return on_front
