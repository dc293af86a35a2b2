"""Seed statistics: confidence intervals, paired tests, Holm's correction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from peftlab.analysis.sequential import FIXED, Design


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
    se: float = math.nan  # standard error of the difference
    df: float = math.nan  # its degrees of freedom (n - 1 paired, Welch-Satterthwaite unpaired)
    sd: float = math.nan  # sd of the per-seed differences (paired only)


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
        else:  # scipy's ttest_rel, computed directly (studies compare often: adaptive seeds, simulations)
            t = diff.mean / (diff.std / math.sqrt(len(seeds)))
            p, name = float(2 * stats.t.sf(abs(t), len(seeds) - 1)), "paired t"
        return Comparison(len(seeds), name, diff.mean, diff.low, diff.high, _relative(diff.mean, base_mean), p,
                          diff.std / math.sqrt(len(seeds)), len(seeds) - 1, diff.std)
    base_mean = float(np.mean(list(baseline.values())))
    a, b = np.array(list(candidate.values())), np.array(list(baseline.values()))
    difference = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return Comparison(min(len(a), len(b)), "none (n < 2)", difference, math.nan, math.nan,
                          _relative(difference, base_mean), math.nan)
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return Comparison(min(len(a), len(b)), "welch t", difference, float(ci.low), float(ci.high),
                      _relative(difference, base_mean), float(result.pvalue), se, float(result.df))


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


def adjusted(comparisons: Sequence[Comparison], design: Design = FIXED) -> list[float]:
    """The p-values a verdict compares with the design's alpha: each comparison's sequential p-value over
    the design's looks (the plain one with one look), Holm-corrected across `comparisons`."""
    return holm([design.p(c.p) for c in comparisons])


POWER = 0.8  # of the detectable differences and the seeds needed
MAX_SEEDS = 1000  # beyond this, "seeds needed" is reported as out of reach


@dataclass(frozen=True)
class Verdict:
    """What a comparison concludes: better, worse, equivalent within ±margin, or unresolved."""

    outcome: str  # better | worse | equivalent | unresolved
    margin: float  # the equivalence margin, in the metric's units
    detectable: float  # smallest difference these seeds detect at POWER (nan where no test applies)
    seeds_needed: int | None  # paired seeds to detect a difference of `margin` at POWER; None: unknown or > MAX_SEEDS
    alpha: float  # the level `detectable` and `seeds_needed` are computed at
    reason: str = ""  # why no test applies (a constant difference, one seed)


def equivalent(comparison: Comparison, margin: float, alpha: float = 0.05) -> bool:
    """TOST (Schuirmann 1987): both one-sided tests reject at `alpha`, i.e. the (1 - 2 alpha) interval of
    the mean difference lies inside (-margin, margin)."""
    if math.isnan(comparison.se) or not comparison.df > 0:
        return False
    half = float(stats.t.ppf(1 - alpha, comparison.df)) * comparison.se
    return -margin < comparison.difference - half and comparison.difference + half < margin


def detectable_difference(se: float, df: float, alpha: float, power: float = POWER) -> float:
    """Minimal detectable difference of a two-sided t-test at level alpha: (t_{1-alpha/2,df} + t_{power,df}) x se."""
    if math.isnan(se) or not df > 0:
        return math.nan
    return (float(stats.t.ppf(1 - alpha / 2, df)) + float(stats.t.ppf(power, df))) * se


def seeds_needed(sd: float, margin: float, alpha: float, power: float = POWER) -> int | None:
    """Paired seeds at which a true difference of `margin` is detected with `power`, given the sd of the
    per-seed differences; solved by iteration, since t's degrees of freedom grow with n."""
    if math.isnan(sd) or margin <= 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if detectable_difference(sd / math.sqrt(n), n - 1, alpha, power) <= margin:
            return n
    return None


def verdict(comparison: Comparison, p_adjusted: float, margin: float, higher_is_better: bool, family: int = 1,
            design: Design = FIXED) -> Verdict:
    """better / worse: the (multiplicity-adjusted, sequential) p-value is below the design's alpha; equivalent:
    TOST within ±margin at the design's one-sided level per look; otherwise unresolved. The detectable
    difference and the seeds needed are computed at the two-sided level per look for alpha / family
    (Bonferroni), so that a difference of that size would survive Holm's correction over the family."""
    strict = design.level(design.alpha / max(family, 1))
    detectable, needed, reason = math.nan, None, ""
    if comparison.test == CONSTANT:  # sd 0: no power calculation means anything
        reason = "the same difference on every seed"
    elif math.isnan(comparison.se):
        reason = "fewer than two seeds"
    else:
        detectable = detectable_difference(comparison.se, comparison.df, strict)
        needed = seeds_needed(comparison.sd, margin, strict)
    return Verdict(outcome(comparison, p_adjusted, margin, higher_is_better, design), margin, detectable, needed,
                   strict, reason)


def outcome(comparison: Comparison, p_adjusted: float, margin: float, higher_is_better: bool,
            design: Design = FIXED) -> str:
    """better / worse when the adjusted p-value is below the design's alpha, equivalent when TOST holds at
    its one-sided level per look, else unresolved."""
    if not math.isnan(p_adjusted) and p_adjusted < design.alpha:
        return "better" if (comparison.difference > 0) == higher_is_better else "worse"
    return "equivalent" if equivalent(comparison, margin, design.level(sided=1)) else "unresolved"
