"""Levels for a study that tests its comparisons at more than one look (seeds until resolved).

Testing after every added seed and stopping at the first p < 0.05 inflates false positives: 0.14 with 5
looks, 0.19 with 10 (Armitage, McPherson and Rowe 1969). A `Design` fixes the looks in advance (the paired
seeds at each) and turns a paired t-test's p-value at any look into a *sequential p-value*: the chance, with
no true difference, that a p-value this small would turn up at some planned look. Compared with alpha, it
gives one constant nominal level at every look (a Pocock-type boundary for the t-test). Bonferroni over the
looks (alpha / looks) also holds but wastes the looks' correlation: at looks 3, 4, ..., 12 it tests at 0.005
where 0.0106 keeps the same error.

The null distribution of the smallest p-value over the looks is simulated: the paired t statistic's null
distribution does not depend on the spread of the differences, so one simulation per look schedule serves
every study. It is seeded (repeatable) and cached on disk, computed once per schedule.

Precision: with N = SIMULATIONS null paths, k of which reach a p-value at or below p, the sequential p-value
is the one-sided Clopper-Pearson upper bound of k / N at confidence 1 - BOUND_ERROR. It is therefore at
least the exact value except with probability BOUND_ERROR (0.001), and exceeds it by about
3.1 sqrt(p / N): 5% of p at p = 0.002, 1.5% at 0.02. Monte Carlo error can make it too large, never (beyond
that 0.001) too small. `tests/test_adaptive.py` checks it against an independent simulation.

A comparison whose runs failed can have fewer pairs at a look than planned; its p-value is still read
against the planned schedule, an approximation.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from peftlab.files import cache_dir

if TYPE_CHECKING:
    from peftlab.specs import StudySpec

ALPHA = 0.05  # the family-wise level of a study's tests
SIMULATIONS = 2_000_000
SIMULATION_SEED = 0
BOUND_ERROR = 0.001  # the chance that a sequential p-value is below the exact one
SUGGESTION_SIMULATIONS = 200_000  # for the seeds a suggestion names, not for any verdict
_CHUNK = 250_000


@dataclass(frozen=True)
class Design:
    """The planned looks (paired seeds at each, increasing), the seeds added per round and the family-wise
    level. One look, or none given, is a fixed design: sequential p-values equal the plain ones."""

    looks: tuple[int, ...] = ()
    alpha: float = ALPHA
    step: int = 0  # seeds added per round (0: a fixed design)
    simulations: int = SIMULATIONS
    futility: float = 0.0  # no more seeds below this chance of resolving by the last look (`analysis.futility`)

    @property
    def sequential(self) -> bool:
        return len(self.looks) > 1

    @property
    def max_seeds(self) -> int | None:
        return self.looks[-1] if self.looks else None

    def p(self, p: float, sided: int = 2) -> float:
        """An upper bound (at 1 - BOUND_ERROR) of the chance, with no true difference, that some planned
        look shows a p-value at or below `p`."""
        if not self.sequential or math.isnan(p):
            return p
        minima = _minima(self.looks, self.simulations)[sided]
        return _upper(int(np.searchsorted(minima, p, side="right")), len(minima))

    def level(self, alpha: float | None = None, sided: int = 2) -> float:
        """The nominal level of each look: a p-value at or below it has a sequential p-value at or below
        `alpha` (default: the design's)."""
        alpha = self.alpha if alpha is None else alpha
        if not self.sequential:
            return alpha
        minima = _minima(self.looks, self.simulations)[sided]
        allowed = _most_crossings(alpha, len(minima))
        return float(minima[allowed - 1]) if allowed >= 1 else 0.0

    def extended(self, maximum: int, simulations: int = SUGGESTION_SIMULATIONS) -> Design:
        """The same design with another maximum number of seeds (the looks `planned_looks` would give)."""
        first = self.looks[0] if self.looks else maximum
        looks = (*range(first, maximum, self.step), maximum) if self.step and maximum > first else (maximum,)
        return Design(looks, self.alpha, self.step, simulations, self.futility)


FIXED = Design()


def _upper(crossings: int, simulations: int) -> float:
    """The one-sided Clopper-Pearson upper bound of crossings / simulations at 1 - BOUND_ERROR."""
    from scipy import stats

    if crossings >= simulations:
        return 1.0
    return float(stats.beta.ppf(1 - BOUND_ERROR, crossings + 1, simulations - crossings))


@lru_cache(maxsize=256)
def _most_crossings(alpha: float, simulations: int) -> int:
    """The most crossings whose upper bound stays at or below alpha (binary search: the bound rises with k)."""
    low, high = 0, simulations  # _upper(low - 1) <= alpha < _upper(high), with _upper(-1) taken as 0
    while low < high:
        middle = (low + high) // 2
        if _upper(middle, simulations) <= alpha:
            low = middle + 1
        else:
            high = middle
    return low - 1


def planned_looks(spec: StudySpec) -> tuple[int, ...]:
    """The seeds of each look: the first seeds, then `step` more per round, up to `max`."""
    first = len(spec.seeds)
    if spec.until_resolved is None:
        return (first,)
    rounds = spec.until_resolved
    return (*range(first, rounds.max, rounds.step), rounds.max)


def study_design(spec: StudySpec, alpha: float = ALPHA) -> Design:
    """The sequential design of a study: its planned looks at level alpha."""
    rounds = spec.until_resolved
    return Design(planned_looks(spec), alpha, rounds.step if rounds else 0, futility=rounds.futility if rounds else 0.0)


@lru_cache(maxsize=16)
def _minima(looks: tuple[int, ...], simulations: int = SIMULATIONS) -> dict[int, np.ndarray]:
    """sided (1 or 2) -> the sorted smallest p-value over the looks of each simulated null comparison
    (normal per-seed differences; one-sided: that the mean difference is above zero). Cached on disk."""
    key = hashlib.sha256(f"{looks}|{simulations}|{SIMULATION_SEED}|v2".encode()).hexdigest()[:20]
    path = cache_dir() / "sequential" / f"{key}.npz"
    try:
        with np.load(path) as stored:
            return {1: stored["one"], 2: stored["two"]}
    except (OSError, KeyError, ValueError):
        pass
    minima = _simulate(looks, simulations)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{id(minima)}.tmp.npz")
    np.savez(tmp, one=minima[1], two=minima[2])
    tmp.replace(path)
    return minima


def _simulate(looks: tuple[int, ...], simulations: int) -> dict[int, np.ndarray]:
    from scipy import stats

    rng = np.random.default_rng(SIMULATION_SEED)
    parts: dict[int, list[np.ndarray]] = {1: [], 2: []}
    for start in range(0, simulations, _CHUNK):
        rows = min(_CHUNK, simulations - start)
        differences = rng.standard_normal((rows, looks[-1]))  # (paths, seeds)
        sums, squares = np.cumsum(differences, axis=1), np.cumsum(differences**2, axis=1)
        lowest = {1: np.ones(rows), 2: np.ones(rows)}
        for n in looks:
            mean = sums[:, n - 1] / n
            sd = np.sqrt(np.maximum(squares[:, n - 1] - n * mean**2, 0) / (n - 1))
            t = mean / (sd / math.sqrt(n))
            tail = stats.t.sf(np.abs(t), n - 1)
            lowest[1] = np.minimum(lowest[1], np.where(t > 0, tail, 1 - tail))
            lowest[2] = np.minimum(lowest[2], 2 * tail)
        for sided in parts:
            parts[sided].append(lowest[sided])
    return {sided: np.sort(np.concatenate(chunks)) for sided, chunks in parts.items()}
