"""Seeds until resolved: seeds go only where a comparison is unresolved, stop at the maximum, and the
procedure keeps the false-positive rate at or below its level on studies with no true difference."""

import math

import numpy as np
import pytest

from peftlab.analysis.sequential import Design, planned_looks, study_design
from peftlab.config import validate
from peftlab.specs import StudySpec
from peftlab.studies.adaptive import next_counts, outcomes
from peftlab.studies.grid import seeds_of
from peftlab.studies.simulate import simulate_study


def spec(minimum=3, maximum=12, step=1, futility=0.1):
    return validate(StudySpec, {"name": "s", "seeds": {"min": minimum, "max": maximum, "step": step,
                                                       "futility": futility}}, "test")


def test_the_looks_are_planned_in_advance():
    assert planned_looks(spec(3, 12, 1)) == tuple(range(3, 13))
    assert planned_looks(spec(3, 12, 4)) == (3, 7, 11, 12)
    assert seeds_of(spec(3, 12), 5) == [0, 1, 2, 3, 4]
    custom = validate(StudySpec, {"name": "s", "seeds": [5, 9], "until_resolved": {"max": 4}}, "test")
    assert seeds_of(custom, 4) == [5, 9, 10, 11] and planned_looks(custom) == (2, 3, 4)


def test_seeds_go_only_to_unresolved_comparisons_and_stop_at_the_maximum():
    s = spec(3, 5, 1, futility=0)  # the noisy comparison would stop for futility (below)
    base = {0: 0.80, 1: 0.82, 2: 0.78}
    quality = {
        "base": base,
        "clear": {k: v + 0.10 + 0.001 * k for k, v in base.items()},  # better by 0.1 on every seed
        "same": {k: v + 0.0001 * (-1) ** k for k, v in base.items()},  # equivalent within 0.01
        "noisy": {k: v + 0.05 * (-1) ** k for k, v in base.items()},  # cannot be told apart yet
    }
    verdicts = outcomes({k: v for k, v in quality.items() if k != "noisy"}, "base", 0.01, True, study_design(s))
    assert verdicts == {"clear": "better", "same": "equivalent"}
    # beside a noisy comparison, the pooled spread says a 2-df spread this small may be luck: not yet equivalent
    verdicts = outcomes(quality, "base", 0.01, True, study_design(s))
    assert verdicts == {"clear": "better", "same": "unresolved", "noisy": "unresolved"}
    assert next_counts(quality, "base", verdicts, s) == {"base": 4, "clear": 3, "same": 4, "noisy": 4}
    at_max = {label: {**values, 3: values[0], 4: values[1]} for label, values in quality.items()}
    assert next_counts(at_max, "base", verdicts, s) == {label: 5 for label in quality}  # the maximum: no more
    # with futility: differences of ±0.05 cannot settle ±0.01 in two more seeds, so no more for noisy
    verdicts = outcomes(quality, "base", 0.01, True, study_design(spec(3, 5, 1)))
    assert verdicts == {"clear": "better", "same": "unresolved", "noisy": "futile"}
    assert next_counts(quality, "base", verdicts, s) == {"base": 4, "clear": 3, "same": 4, "noisy": 3}


def error_rate(s, differences, studies, margin=0.02, seed=0, **options):
    """(false better/worse, false equivalent) shares over simulated studies, and the mean runs per study."""
    rng = np.random.default_rng(seed)
    results = [simulate_study(rng, s, differences, margin, **options) for _ in range(studies)]
    return (np.mean([r.false_difference for r in results]), np.mean([r.false_equivalence for r in results]),
            np.mean([r.runs for r in results]))


def at_most(rate, level, studies):
    """At or below `level`, up to two standard errors of the simulation."""
    return rate <= level + 2 * math.sqrt(level * (1 - level) / studies)


@pytest.mark.parametrize("minimum,maximum,step,studies", [(3, 12, 1, 600), (3, 12, 3, 1000)])
def test_adding_seeds_keeps_the_false_positive_rate_at_its_level(minimum, maximum, step, studies):
    # sequential p-values over the planned looks keep it at 0.05; a plain 0.05 at each of 10 looks reaches about 0.19
    false_difference, _, _ = error_rate(spec(minimum, maximum, step), [0.0] * 3, studies, margin=0.01)
    assert at_most(false_difference, 0.05, studies)


@pytest.mark.parametrize("maximum,step", [(6, 3), (12, 3)])
def test_false_equivalence_stays_at_its_level_across_comparisons(maximum, step):
    # four comparisons whose true difference is the margin: uncorrected TOST called one of them equivalent in
    # up to 14% of studies; Holm over sequential TOST p-values keeps any false "equivalent" at 0.05
    false_difference, false_equivalence, _ = error_rate(spec(3, maximum, step), [0.02] * 4, 1000, noise_sd=0.01)
    assert at_most(false_equivalence, 0.05, 1000) and false_difference == 0


def test_the_sequential_level_lies_between_bonferroni_and_the_plain_level():
    looks = Design(tuple(range(3, 13)))
    level = looks.level()
    assert 0.05 / 10 < level < 0.05  # the looks are correlated: Bonferroni over them is too strict
    assert looks.p(level) <= 0.05 < looks.p(level * 1.2)
    assert looks.level(sided=1) > looks.level(sided=2) / 2  # one-sided crossings: the level TOST uses
    assert Design((5,)).p(0.03) == 0.03 and Design((5,)).level() == 0.05  # one look: plain p-values
    two = Design((3, 6))
    assert two.p(0.01) > 0.01 and 0.025 < two.level() < 0.03  # two looks: close to Bonferroni's 0.025


def test_sequential_p_values_are_never_below_an_independent_simulation():
    # the Monte Carlo bound: an independent simulation (another seed) of looks 3 and 6 must not find a sequential
    # p-value larger than ours beyond its own error, and ours stays within about 10% of it in the tail
    from scipy import stats

    design = Design((3, 6))
    rng = np.random.default_rng(12345)
    d = rng.standard_normal((400_000, 6))
    t = [d[:, :n].mean(1) / (d[:, :n].std(1, ddof=1) / math.sqrt(n)) for n in (3, 6)]
    smallest = np.minimum(2 * stats.t.sf(np.abs(t[0]), 2), 2 * stats.t.sf(np.abs(t[1]), 5))
    for p in (0.0005, 0.001, 0.005, 0.0271):
        independent = float(np.mean(smallest <= p))
        error = math.sqrt(independent / len(smallest))
        assert independent - 3 * error <= design.p(p) <= 1.1 * independent + 3 * error
        assert p <= design.p(p) <= 2 * p * 1.1  # between the plain p-value and Bonferroni over two looks


def test_plain_p_values_at_every_look_inflate_false_positives():
    # the reason for sequential p-values: the same null studies judged at a plain 0.05 at each look
    s = spec(3, 12, 1)
    naive = Design((12,))  # a fixed design's plain p-values, applied at every look
    false_difference, _, _ = error_rate(s, [0.0] * 3, 400, margin=0.01, seed=1, design=naive)
    assert false_difference > 0.08


def test_the_chance_of_resolving_reads_the_demo_s_first_look():
    from scipy import stats

    from peftlab.analysis.futility import DRAWS, resolve_chance

    design = Design((3, 6), step=3, futility=0.1)
    upper, ffn = [-0.029, 0.023, 0.011], [0.008, 0.006, -0.001]  # paired differences from `all` at 3 seeds
    assert resolve_chance(upper, design, 0.02) < 0.1 < 0.5 < resolve_chance(ffn, design, 0.02)
    assert resolve_chance(upper, design, 0.02) == resolve_chance(upper, design, 0.02)  # seeded: one decision
    assert resolve_chance([0.01], design, 0.02) is None and resolve_chance([0.01, 0.01, 0.01], design, 0.02) is None
    assert resolve_chance(upper + [0.0] * 3, design, 0.02) is None  # at the last look there is nothing to predict
    # the same draws judged with p-values (not critical values): the same share
    rng, n, d = np.random.default_rng(0), 3, np.array(ffn)
    sigma = d.std(ddof=1) * np.sqrt((n - 1) / rng.chisquare(n - 1, DRAWS))
    mu = rng.normal(d.mean(), sigma / np.sqrt(n))
    x = np.concatenate([np.broadcast_to(d, (DRAWS, n)), rng.normal(mu[:, None], sigma[:, None], (DRAWS, 3))], axis=1)
    mean, se = x.mean(1), x.std(1, ddof=1) / np.sqrt(6)
    p = 2 * stats.t.sf(np.abs(mean / se), 5)
    tost = np.maximum(stats.t.sf((mean + 0.02) / se, 5), stats.t.sf((0.02 - mean) / se, 5))
    expected = np.mean((p <= design.level()) | (tost <= design.level(sided=1)))
    assert resolve_chance(ffn, design, 0.02) == pytest.approx(expected, abs=1e-9)


def test_futility_saves_seeds_keeps_the_error_rates_and_costs_little_power():
    # the same simulated studies (one seed of the generator) with and without futility; the demo's design
    # (looks at 3 and 6, margin 0.02) with a paired spread like its own (about 0.02 per seed)
    def run(futility, differences, studies=300):
        rng = np.random.default_rng(7)
        results = [simulate_study(rng, spec(3, 6, 3, futility), differences, 0.02, seed_sd=0.03, noise_sd=0.015)
                   for _ in range(studies)]
        return (np.mean([r.false_difference for r in results]), np.mean([r.false_equivalence for r in results]),
                np.mean([r.runs for r in results]), np.mean([r.resolved for r in results]) / len(differences))

    for differences in ([0.0] * 3, [0.02] * 3, [0.01, 0.03, 0.05]):
        (fd_on, fe_on, runs_on, resolved_on), (fd_off, fe_off, runs_off, resolved_off) = (
            run(0.1, differences), run(0.0, differences))
        assert fd_on <= fd_off and fe_on <= fe_off + 0.01  # never more false verdicts than without
        assert at_most(fd_on, 0.05, 300) and at_most(fe_on, 0.05, 300)
        assert runs_on < runs_off  # seeds saved
        assert resolved_on >= resolved_off - 0.03  # at most 3 points of resolved comparisons lost
