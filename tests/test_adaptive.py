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


def spec(minimum=3, maximum=12, step=1):
    return validate(StudySpec, {"name": "s", "seeds": {"min": minimum, "max": maximum, "step": step}}, "test")


def test_the_looks_are_planned_in_advance():
    assert planned_looks(spec(3, 12, 1)) == tuple(range(3, 13))
    assert planned_looks(spec(3, 12, 4)) == (3, 7, 11, 12)
    assert seeds_of(spec(3, 12), 5) == [0, 1, 2, 3, 4]
    custom = validate(StudySpec, {"name": "s", "seeds": [5, 9], "until_resolved": {"max": 4}}, "test")
    assert seeds_of(custom, 4) == [5, 9, 10, 11] and planned_looks(custom) == (2, 3, 4)


def test_seeds_go_only_to_unresolved_comparisons_and_stop_at_the_maximum():
    s = spec(3, 5, 1)
    base = {0: 0.80, 1: 0.82, 2: 0.78}
    quality = {
        "base": base,
        "clear": {k: v + 0.10 + 0.001 * k for k, v in base.items()},  # better by 0.1 on every seed
        "same": {k: v + 0.0001 * (-1) ** k for k, v in base.items()},  # equivalent within 0.01
        "noisy": {k: v + 0.05 * (-1) ** k for k, v in base.items()},  # cannot be told apart yet
    }
    verdicts = outcomes(quality, "base", 0.01, True, study_design(s))
    assert verdicts == {"clear": "better", "same": "equivalent", "noisy": "unresolved"}
    assert next_counts(quality, "base", verdicts, s) == {"base": 4, "clear": 3, "same": 3, "noisy": 4}
    at_max = {label: {**values, 3: values[0], 4: values[1]} for label, values in quality.items()}
    assert next_counts(at_max, "base", verdicts, s) == {label: 5 for label in quality}  # the maximum: no more


def simulate_null_study(rng, looks_spec, configurations=3, margin=0.01, plan=None):
    """One study whose configurations all have the same true accuracy; True when any look declared a
    configuration better or worse than the baseline."""
    labels = ["base", *(f"c{i}" for i in range(configurations))]
    plan = plan or study_design(looks_spec)
    seed_effect = rng.normal(0, 0.03, 64)  # a seed moves every configuration alike: what pairing removes
    noise = rng.normal(0, 0.02, (len(labels), 64))
    counts = {label: len(looks_spec.seeds) for label in labels}
    while True:
        quality = {label: {s: 0.8 + seed_effect[s] + noise[i, s] for s in range(counts[label])}
                   for i, label in enumerate(labels)}
        verdicts = outcomes(quality, "base", margin, True, plan)
        if any(v in ("better", "worse") for v in verdicts.values()):
            return True
        following = next_counts(quality, "base", verdicts, looks_spec)
        if following == counts:
            return False
        counts = following


@pytest.mark.parametrize("minimum,maximum,step,studies", [(3, 12, 1, 600), (3, 12, 3, 1000)])
def test_adding_seeds_keeps_the_false_positive_rate_at_its_level(minimum, maximum, step, studies):
    # sequential p-values over the planned looks keep it at 0.05; a plain 0.05 at each of 10 looks reaches about 0.19
    rng = np.random.default_rng(0)
    s = spec(minimum, maximum, step)
    false_positives = sum(simulate_null_study(rng, s) for _ in range(studies))
    # at or below 0.05, up to two standard errors of the simulation (0.064 at 1,000 studies)
    assert false_positives / studies <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / studies)


def test_the_sequential_level_lies_between_bonferroni_and_the_plain_level():
    looks = Design(tuple(range(3, 13)))
    level = looks.level()
    assert 0.05 / 10 < level < 0.05  # the looks are correlated: Bonferroni over them is too strict
    assert looks.p(level) <= 0.05 < looks.p(level * 1.2)
    assert looks.level(sided=1) > looks.level(sided=2) / 2  # one-sided crossings: the level TOST uses
    assert Design((5,)).p(0.03) == 0.03 and Design((5,)).level() == 0.05  # one look: plain p-values
    two = Design((3, 6))
    assert two.p(0.01) > 0.01 and 0.025 < two.level() < 0.03  # two looks: close to Bonferroni's 0.025


def test_plain_p_values_at_every_look_inflate_false_positives():
    # the reason for sequential p-values: the same null studies judged at a plain 0.05 at each look
    rng = np.random.default_rng(1)
    s = spec(3, 12, 1)
    naive = Design((12,))  # a fixed design's plain p-values, applied at every look
    false_positives = sum(simulate_null_study(rng, s, plan=naive) for _ in range(400))
    assert false_positives / 400 > 0.08
