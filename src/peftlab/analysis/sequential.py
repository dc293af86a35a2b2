"""Levels for a study that tests its comparisons at more than one look (seeds until resolved).

Testing after every added seed and stopping at the first p < 0.05 inflates false positives: 0.14 with 5
looks, 0.19 with 10 (Armitage, McPherson and Rowe 1969). A `Design` fixes the looks in advance (the paired
seeds at each) and turns a paired t-test's p-value at any look into a *sequential p-value*: the chance, with
no true difference, that a p-value this small would turn up at some planned look. Compared with alpha, it
gives one constant nominal level at every look (a Pocock-type boundary for the t-test), found by simulating
the paired t statistic over the looks. The t statistic's null distribution does not depend on the spread of
the differences, so one simulation per look schedule serves every study; it is seeded, hence repeatable.
Bonferroni over the looks (alpha / looks) also holds but wastes the looks' correlation: at looks 3, 4, ..., 12
it tests at 0.005 where 0.0106 keeps the same error.

A comparison whose runs failed can have fewer pairs at a look than planned; its p-value is still read
against the planned schedule, an approximation.

The simulation is Monte Carlo: a sequential p-value is (crossings + 1) / (simulations + 1), which errs on the
conservative side. `tests/test_adaptive.py` checks the whole procedure on thousands of null studies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from peftlab.specs import StudySpec

ALPHA = 0.05  # the family-wise level of a study's tests
SIMULATIONS = 200_000
SIMULATION_SEED = 0


@dataclass(frozen=True)
class Design:
    """The planned looks (paired seeds at each, increasing) and the family-wise level. One look, or none
    given, is a fixed design: sequential p-values equal the plain ones."""

    looks: tuple[int, ...] = ()
    alpha: float = ALPHA

    @property
    def sequential(self) -> bool:
        return len(self.looks) > 1

    def p(self, p: float, sided: int = 2) -> float:
        """The chance, with no true difference, that some planned look shows a p-value at or below `p`."""
        if not self.sequential or math.isnan(p):
            return p
        minima = _minima(self.looks)[sided]
        return (int(np.searchsorted(minima, p, side="right")) + 1) / (len(minima) + 1)

    def level(self, alpha: float | None = None, sided: int = 2) -> float:
        """The nominal level of each look: a p-value at or below it has a sequential p-value at or below
        `alpha` (default: the design's)."""
        alpha = self.alpha if alpha is None else alpha
        if not self.sequential:
            return alpha
        minima = _minima(self.looks)[sided]
        allowed = math.floor(alpha * (len(minima) + 1)) - 1  # crossings a level may have: (k + 1) / (N + 1) <= alpha
        return float(minima[allowed - 1]) if allowed >= 1 else 0.0


FIXED = Design()


def planned_looks(spec: StudySpec) -> tuple[int, ...]:
    """The seeds of each look: the first seeds, then `step` more per round, up to `max`."""
    first = len(spec.seeds)
    if spec.until_resolved is None:
        return (first,)
    rounds = spec.until_resolved
    return (*range(first, rounds.max, rounds.step), rounds.max)


def study_design(spec: StudySpec, alpha: float = ALPHA) -> Design:
    """The sequential design of a study: its planned looks at level alpha."""
    return Design(planned_looks(spec), alpha)


@lru_cache(maxsize=16)
def _minima(looks: tuple[int, ...]) -> dict[int, np.ndarray]:
    """sided (1 or 2) -> the sorted smallest p-value over the looks of each simulated null comparison
    (normal per-seed differences; one-sided: that the mean difference is above zero)."""
    from scipy import stats

    rng = np.random.default_rng(SIMULATION_SEED)
    differences = rng.standard_normal((SIMULATIONS, looks[-1]))
    sums, squares = np.cumsum(differences, axis=1), np.cumsum(differences**2, axis=1)
    lowest = {1: np.ones(SIMULATIONS), 2: np.ones(SIMULATIONS)}
    for n in looks:
        mean = sums[:, n - 1] / n
        sd = np.sqrt(np.maximum(squares[:, n - 1] - n * mean**2, 0) / (n - 1))
        t = mean / (sd / math.sqrt(n))
        lowest[1] = np.minimum(lowest[1], stats.t.sf(t, n - 1))
        lowest[2] = np.minimum(lowest[2], 2 * stats.t.sf(np.abs(t), n - 1))
    return {sided: np.sort(values) for sided, values in lowest.items()}
