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
    """The p-values a better / worse verdict compares with the design's alpha: each comparison's sequential
    p-value over the design's looks (the plain one with one look), Holm-corrected across `comparisons`."""
    return holm([design.p(c.p) for c in comparisons])


POWER = 0.8  # of the detectable differences and the seeds needed
MAX_SEEDS = 1000  # beyond this, "seeds needed" is reported as out of reach


@dataclass(frozen=True)
class Verdict:
    """What a comparison concludes: better, worse, equivalent within ±margin, unresolved, or no verdict
    (`not trained`: a configuration none of whose runs learned anything)."""

    outcome: str  # better | worse | equivalent | unresolved | not trained
    margin: float  # the equivalence margin, in the metric's units
    detectable: float  # smallest difference these seeds detect at POWER (nan where no test applies)
    seeds_needed: int | None  # paired seeds to detect a difference of `margin` at POWER; None: unknown or > MAX_SEEDS
    alpha: float  # the two-sided level per look `detectable` and `seeds_needed` are computed at
    reason: str = ""  # why no test applies (a constant difference, one seed, nothing trained)
    p: float = math.nan  # better / worse: the sequential p-value, Holm-corrected over the family
    p_equivalence: float = math.nan  # equivalent: the sequential TOST p-value, Holm-corrected over the family
    max_seeds: int | None = None  # the most seeds the study's design gives a comparison (None: not adaptive)
    raise_max_to: int | None = None  # the seeds.max at which the design would reach `seeds_needed`
    futility: float | None = None  # unresolved with no more seeds: its chance of resolving by the maximum was this
    stopped_at: int | None = None  # ... at this many paired seeds (`analysis.futility`)


def power(difference: float, se: float, df: float, alpha: float) -> float:
    """Exact power of a two-sided t-test at level alpha against a true difference, from the noncentral t
    (noncentrality difference / se)."""
    critical = float(stats.t.ppf(1 - alpha / 2, df))
    shift = abs(difference) / se
    toward = float(stats.nct.sf(critical, df, shift))
    away = float(stats.nct.cdf(-critical, df, shift))  # scipy returns nan far in this tail, where it is ~0
    return (1.0 if math.isnan(toward) else toward) + (0.0 if math.isnan(away) else away)


def detectable_difference(se: float, df: float, alpha: float, power_wanted: float = POWER) -> float:
    """The smallest true difference a two-sided t-test at level alpha detects with `power_wanted`: solved
    exactly on the noncentral t (the shortcut (t_{1-alpha/2} + t_{power}) x se is 5-15% too small at 5-2 df)."""
    if math.isnan(se) or not df > 0 or not se > 0 or not alpha > 0:
        return math.nan
    from scipy.optimize import brentq

    high = (float(stats.t.ppf(1 - alpha / 2, df)) + float(stats.t.ppf(power_wanted, df))) * se
    while power(high, se, df, alpha) < power_wanted:
        high *= 1.5
    return float(brentq(lambda d: power(d, se, df, alpha) - power_wanted, 0.0, high, xtol=1e-12 * high + 1e-15))


def seeds_needed(sd: float, margin: float, alpha: float, power_wanted: float = POWER) -> int | None:
    """The fewest paired seeds at which a true difference of `margin` is detected with `power_wanted` (exact
    noncentral-t power), given the sd of the per-seed differences; None beyond MAX_SEEDS."""
    if math.isnan(sd) or not sd > 0 or margin <= 0 or not alpha > 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if power(margin, sd / math.sqrt(n), n - 1, alpha) >= power_wanted:
            return n
    return None


def tost_p(comparison: Comparison, margin: float, sd: float | None = None, df: float | None = None) -> float:
    """The p-value of TOST (Schuirmann 1987) within ±margin: the larger of the two one-sided t-tests' p-values
    (against -margin and +margin). `sd` and `df` replace the comparison's own spread of paired differences
    (a pooled one). nan where no test applies (one seed, the same difference on every seed)."""
    se = comparison.se if sd is None else sd / math.sqrt(comparison.n)
    df = comparison.df if df is None else df
    if math.isnan(se) or not se > 0 or not df > 0:
        return math.nan
    above_lower = float(stats.t.sf((comparison.difference + margin) / se, df))  # H0: difference <= -margin
    below_upper = float(stats.t.cdf((comparison.difference - margin) / se, df))  # H0: difference >= +margin
    return max(above_lower, below_upper)


def equivalent(comparison: Comparison, margin: float, alpha: float = 0.05) -> bool:
    """TOST at `alpha` on the comparison's own spread: both one-sided tests reject, i.e. the (1 - 2 alpha)
    interval of the mean difference lies inside (-margin, margin)."""
    p = tost_p(comparison, margin)
    return not math.isnan(p) and p < alpha


def pooled_spread(comparisons: Sequence[Comparison]) -> tuple[float, float] | None:
    """(sd, df) of the per-seed paired differences pooled over the comparisons that have one, or None."""
    paired = [c for c in comparisons if c.df > 0 and c.sd > 0 and math.isfinite(c.sd)]
    if not paired:
        return None
    df = sum(c.df for c in paired)
    return math.sqrt(sum(c.df * c.sd**2 for c in paired) / df), df


def equivalence_p(comparison: Comparison, margin: float, pooled: tuple[float, float] | None) -> float:
    """The TOST p-value an equivalence verdict uses: the larger of the comparison's own and the pooled spread's.
    A spread of 2 degrees of freedom is often small by chance (one in seven is under 40% of the true one); the
    pooled spread of every comparison in the study must agree before equivalence is declared."""
    own = tost_p(comparison, margin)
    if pooled is None or math.isnan(own) or math.isnan(comparison.sd):  # unpaired (Welch): its own spread only
        return own
    return max(own, tost_p(comparison, margin, *pooled))


def judge(comparisons: Sequence[Comparison], margin: float, higher_is_better: bool, design: Design = FIXED,
          power_figures: bool = True, pooled_from: Sequence[bool] | None = None) -> list[Verdict]:
    """The verdicts of a family of comparisons. Two families share the study's alpha, each with its own
    guarantee whatever the number of comparisons and looks: better / worse from the sequential p-values,
    Holm-corrected (with no true difference, any false better or worse has chance at most alpha); equivalent
    from the sequential TOST p-values, Holm-corrected (with true differences at the margin, any false
    equivalent has chance at most alpha). Power figures are exact, at the two-sided level per look that the
    most significant comparison of the family needs (left out with `power_figures` False: outcomes only).
    `pooled_from` says which comparisons the pooled spread is taken over (default: all; runs that collapsed
    measure a training failure, not seed noise)."""
    p_difference = adjusted(comparisons, design)
    pooled = pooled_spread([c for i, c in enumerate(comparisons) if pooled_from is None or pooled_from[i]])
    p_equivalence = holm([design.p(equivalence_p(c, margin, pooled), sided=1) for c in comparisons])
    family = max(1, sum(not math.isnan(p) for p in p_difference))
    return [_verdict(c, p, q, margin, higher_is_better, family, design, power_figures)
            for c, p, q in zip(comparisons, p_difference, p_equivalence)]


def _verdict(comparison: Comparison, p: float, p_equivalence: float, margin: float, higher_is_better: bool,
             family: int, design: Design, power_figures: bool = True) -> Verdict:
    strict = design.level(design.alpha / family)
    detectable, needed, raise_to, reason = math.nan, None, None, ""
    if comparison.test == CONSTANT or comparison.sd == 0:  # sd 0: no power calculation means anything
        reason = "the same difference on every seed"
    elif math.isnan(comparison.se):
        reason = "fewer than two seeds"
    elif power_figures:
        detectable = detectable_difference(comparison.se, comparison.df, strict)
        needed = seeds_needed(comparison.sd, margin, strict)
        if needed is not None and design.step and needed > design.max_seeds:
            raise_to = _maximum_reaching(comparison.sd, margin, family, design, needed)
    if not math.isnan(p) and p < design.alpha:
        result = "better" if (comparison.difference > 0) == higher_is_better else "worse"
    else:
        result = "equivalent" if not math.isnan(p_equivalence) and p_equivalence < design.alpha else "unresolved"
    return Verdict(result, margin, detectable, needed, strict, reason, p, p_equivalence, design.max_seeds, raise_to)


def _maximum_reaching(sd: float, margin: float, family: int, design: Design, needed: int) -> int | None:
    """The smallest seeds.max whose design (more looks: a stricter level per look) reaches the power of
    `needed` seeds at its own maximum; None beyond a few rounds of the search (far out of the design's reach)."""
    maximum = needed
    for _ in range(4):
        wanted = seeds_needed(sd, margin, design.extended(maximum).level(design.alpha / family))
        if wanted is None or wanted > 4 * design.max_seeds + 12:
            return None
        if wanted <= maximum:
            return maximum
        maximum = wanted
    return None


def not_trained(margin: float, reason: str) -> Verdict:
    """The verdict of a configuration whose runs all learned nothing: none."""
    return Verdict("not trained", margin, math.nan, None, math.nan, reason)
