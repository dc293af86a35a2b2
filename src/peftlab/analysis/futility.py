"""Futility: no more seeds for a comparison that will almost surely stay unresolved.

With seeds until resolved, an unresolved comparison gets `step` more seeds per round up to `max`. Some have no
realistic chance of resolving by then (a difference near the margin with a wide spread), and their seeds (and the
baseline's) buy nothing. At each look before the last, an unresolved comparison goes on only while its *predictive
probability* of resolving at one of the remaining planned looks is at least the design's `futility`
(`seeds.futility`, 10% by default; 0 turns it off).

The probability is the posterior predictive one for normal paired differences under the reference prior
(p(mu, sigma) proportional to 1 / sigma): sigma^2 = (n - 1) s^2 / chi2(n - 1), mu ~ N(mean, sigma^2 / n), and the
remaining seeds' differences ~ N(mu, sigma^2). A drawn continuation resolves when at some remaining look its paired
t-test's p-value is at or below the design's per-look level (better or worse) or its TOST p-value is at or below the
one-sided per-look level (equivalent). Holm's correction and the pooled spread are left out: both only make
resolving harder, so the chance is overstated and fewer comparisons stop than an exact rule would stop.

Stopping for futility never raises an error rate: it is non-binding (it only ever removes looks), each verdict's
sequential p-value is still read against the full planned schedule, and Holm's adjusted p-values only grow when
a comparison keeps a larger p-value. What it costs is power: `tests/test_adaptive.py` measures both by simulation.
The draws are seeded, so a study and its report take the same decision from the same runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

import numpy as np

from peftlab.analysis.sequential import Design
from peftlab.analysis.stats import Verdict

FUTILE = "futile"  # the outcome `studies.adaptive` gives an unresolved comparison that gets no more seeds

DRAWS = 4_000  # predictive draws (a standard error of 0.5 points at 10%)
SEED = 0


def paired_differences(candidate: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """Candidate minus baseline on the seeds both have, in seed order."""
    return [candidate[s] - baseline[s] for s in sorted(candidate.keys() & baseline.keys())]


def resolve_chance(differences: Sequence[float], design: Design, margin: float, draws: int = DRAWS) -> float | None:
    """The predictive probability that a comparison with these paired differences resolves (better, worse or
    equivalent within ±margin) at one of the design's looks after this one; None where it cannot be told (fewer
    than two differences, no spread, no later look)."""
    d = np.asarray(differences, dtype=float)
    n = len(d)
    later = [look for look in design.looks if look > n]
    if n < 2 or not later or not d.std(ddof=1) > 0:
        return None
    rng = np.random.default_rng(SEED)
    sigma = d.std(ddof=1) * np.sqrt((n - 1) / rng.chisquare(n - 1, draws))
    mu = rng.normal(d.mean(), sigma / np.sqrt(n))
    future = rng.normal(mu[:, None], sigma[:, None], (draws, later[-1] - n))
    sums, squares = d.sum() + np.cumsum(future, axis=1), (d**2).sum() + np.cumsum(future**2, axis=1)
    two_sided, one_sided = design.level(), design.level(sided=1)
    resolved = np.zeros(draws, dtype=bool)
    for look in later:  # p <= level, as critical values of t: |t| for a difference, both one-sided t for TOST
        total, square = sums[:, look - n - 1], squares[:, look - n - 1]
        mean = total / look
        se = np.sqrt(np.maximum(square - look * mean**2, 1e-300) / (look - 1) / look)
        differs, within = _critical(two_sided / 2, look - 1), _critical(one_sided, look - 1)
        resolved |= (np.abs(mean) >= differs * se) | (np.minimum(mean + margin, margin - mean) >= within * se)
    return float(resolved.mean())


@lru_cache(maxsize=1024)
def _critical(tail: float, df: int) -> float:
    """The t value with `tail` above it at `df` degrees of freedom."""
    from scipy import stats

    return float(stats.t.isf(tail, df))


def futile(differences: Sequence[float], design: Design, margin: float) -> float | None:
    """The chance of resolving, where it is below the design's futility threshold (no more seeds); None otherwise."""
    if not design.futility or not design.step:
        return None
    chance = resolve_chance(differences, design, margin)
    return chance if chance is not None and chance < design.futility else None


def with_futility(verdict: Verdict, differences: Sequence[float], design: Design) -> Verdict:
    """`verdict`, marked (its chance, at how many seeds) where it is unresolved and futile."""
    if verdict.outcome != "unresolved" or verdict.reason:
        return verdict
    chance = futile(differences, design, verdict.margin)
    return verdict if chance is None else replace(verdict, futility=chance, stopped_at=len(differences))
