"""Seed statistics: confidence intervals, paired tests, Holm's correction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); nan for n < 2
    low: float  # confidence interval; nan for n < 2
    high: float


BOOTSTRAP_MIN_SEEDS = 10  # below this a percentile bootstrap interval undercovers (3 values: 76% for 95%)


def summarize(values: Sequence[float], confidence: float = 0.95, method: str = "t", seed: int = 0) -> Summary:
    """Mean, standard deviation and a confidence interval: t-based (symmetric), or percentile bootstrap
    (asymmetric; reliable from about BOOTSTRAP_MIN_SEEDS values on)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    if method == "bootstrap":
        result = stats.bootstrap((x,), np.mean, confidence_level=confidence, method="percentile",
                                 random_state=np.random.default_rng(seed), n_resamples=5000)
        return Summary(n, mean, std, float(result.confidence_interval.low), float(result.confidence_interval.high))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Comparison:
    n: int  # pairs (paired) or the smaller sample (unpaired)
    test: str  # "paired t", "wilcoxon", "welch t"
    difference: float  # mean of candidate - baseline
    low: float  # CI of the difference
    high: float
    relative: float  # difference / |baseline mean|, in %
    p: float


CONSTANT = "constant difference"  # the test of a paired comparison whose differences are all equal


def compare(candidate: dict[int, float], baseline: dict[int, float], test: str = "t", confidence: float = 0.95) -> Comparison:
    """Candidate vs baseline, values keyed by seed: paired by seed where seeds match, else Welch's t-test.

    Paired differences that are all equal and not zero (typically both arms collapsed to a fixed output)
    leave the t statistic undefined: the comparison is reported as a constant difference, with no p-value,
    rather than as infinitely significant. The relative change divides by the baseline's mean over the
    same seeds as the difference."""
    seeds = sorted(candidate.keys() & baseline.keys())
    if len(seeds) >= 2:
        a = np.array([candidate[s] for s in seeds])
        b = np.array([baseline[s] for s in seeds])
        d = a - b
        diff = summarize(d, confidence)
        base_mean = float(b.mean())
        if test == "wilcoxon":
            p = float(stats.wilcoxon(a, b).pvalue) if np.any(d != 0) else 1.0
            name = "wilcoxon"
        elif np.allclose(d, d[0], rtol=0, atol=1e-12):  # the t statistic is undefined
            p, name = (1.0, "paired t") if abs(d[0]) < 1e-12 else (math.nan, CONSTANT)
        else:
            p, name = float(stats.ttest_rel(a, b).pvalue), "paired t"
        return Comparison(len(seeds), name, diff.mean, diff.low, diff.high, _relative(diff.mean, base_mean), p)
    base_mean = float(np.mean(list(baseline.values())))
    a, b = np.array(list(candidate.values())), np.array(list(baseline.values()))
    difference = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return Comparison(min(len(a), len(b)), "none (n < 2)", difference, math.nan, math.nan,
                          _relative(difference, base_mean), math.nan)
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    return Comparison(min(len(a), len(b)), "welch t", difference, float(ci.low), float(ci.high),
                      _relative(difference, base_mean), float(result.pvalue))


def _relative(difference: float, base: float) -> float:
    return 100 * difference / abs(base) if base else math.nan


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment for a family of tests (nan stays nan, not counted)."""
    indexed = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    indexed.sort()
    m = len(indexed)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
