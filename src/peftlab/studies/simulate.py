"""Simulated studies: how often seeds until resolved declares a false verdict, and how many runs it spends.

No model trains: each configuration's score on seed s is its true mean, plus an effect of the seed shared by
every configuration (what pairing removes), plus noise of its own. The study then runs exactly as a real one
does (`adaptive.outcomes` at each look, `adaptive.next_counts` for the seeds that follow). Used by the test
suite (a few thousand studies) and by `benchmarks/verdicts.py` (more, with intervals).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from peftlab.analysis.sequential import Design, study_design
from peftlab.specs import StudySpec
from peftlab.studies.adaptive import next_counts, outcomes

Outcomes = Callable[[dict[str, dict[int, float]], str, float, bool, Design], dict[str, str]]


@dataclass(frozen=True)
class Simulated:
    false_difference: bool  # some configuration with no true difference was called better or worse
    false_equivalence: bool  # some configuration at least `margin` away was called equivalent
    runs: int  # seed runs the study trained (every configuration, the baseline included)
    resolved: int = 0  # comparisons that ended better, worse or equivalent


def simulate_study(rng: np.random.Generator, spec: StudySpec, differences: list[float], margin: float,
                   seed_sd: float = 0.03, noise_sd: float = 0.02, design: Design | None = None,
                   judge: Outcomes = outcomes) -> Simulated:
    """One study of a baseline and one configuration per true difference from it (higher is better)."""
    labels = ["base", *(f"c{i}" for i in range(len(differences)))]
    truth = dict(zip(labels, [0.0, *differences]))
    design = design or study_design(spec)
    most = spec.until_resolved.max if spec.until_resolved else len(spec.seeds)
    seed_effect = rng.normal(0, seed_sd, most)
    noise = rng.normal(0, noise_sd, (len(labels), most))
    counts = {label: len(spec.seeds) for label in labels}
    false_difference = false_equivalence = False
    while True:
        quality = {label: {s: 0.8 + truth[label] + seed_effect[s] + noise[i, s] for s in range(counts[label])}
                   for i, label in enumerate(labels)}
        verdicts = judge(quality, "base", margin, True, design)
        false_difference |= any(v in ("better", "worse") and truth[label] == 0 for label, v in verdicts.items())
        false_equivalence |= any(v == "equivalent" and abs(truth[label]) >= margin for label, v in verdicts.items())
        following = next_counts(quality, "base", verdicts, spec) if spec.until_resolved else counts
        if following == counts:
            resolved = sum(v in ("better", "worse", "equivalent") for v in verdicts.values())
            return Simulated(false_difference, false_equivalence, sum(counts.values()), resolved)
        counts = following
