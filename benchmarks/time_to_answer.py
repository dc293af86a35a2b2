"""Time to an answer: seeds until resolved against a fixed grid of 12 seeds, replayed from a recorded study.

A simulator is fitted to a finished study (each configuration's mean and the sd of its per-seed
differences from the baseline); each replay draws 12 seeds for every configuration from it, then
- the fixed grid judges every comparison on all 12 seeds (Holm at 0.05, TOST within the margin);
- the adaptive procedure (`studies.adaptive`: 3 seeds, then `step` more per round where a comparison is
  unresolved, judged by sequential p-values over the planned looks) judges on the prefix of those seeds it
  asked for.
It prints how often the two reach the same verdict per comparison (and compatible ones: equivalent against a
significant difference smaller than the margin), and the share of the grid's runs the
adaptive procedure trained. No training happens here: replays take seconds.

    python benchmarks/time_to_answer.py demo/placement            # a study directory
    python benchmarks/time_to_answer.py demo/placement --replays 2000 --max-seeds 12
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import append_result

from peftlab.analysis.analyze import analyze
from peftlab.analysis.sequential import Design, study_design
from peftlab.config import validate
from peftlab.specs import StudySpec
from peftlab.studies.adaptive import next_counts, outcomes


def fitted(study: Path) -> tuple[dict[str, float], dict[str, float], str, float, bool]:
    """(mean per configuration, sd of its paired differences from the baseline (the baseline: sd of its own
    values), baseline, margin, higher is better)."""
    analysis = analyze(study)
    baseline = analysis.baseline
    means = {c.label: c.summary.mean for c in analysis.configurations}
    spreads = {c.label: c.comparison.sd if c.comparison else c.summary.std for c in analysis.configurations}
    return means, spreads, baseline.label, analysis.margin, analysis.higher_is_better


def replay(rng, means, spreads, baseline, margin, higher, rounds: StudySpec) -> tuple[int, int, int, int]:
    """(comparisons with the same verdict, comparisons with compatible verdicts, comparisons, runs the adaptive
    procedure trained) of one replay. Compatible: the same, or one procedure says equivalent where the other
    finds a significant difference smaller than the margin (both true: a difference too small to matter).
    A seed moves every configuration alike (the baseline's spread); each configuration's difference from the
    baseline then varies by its fitted sd, so the paired differences follow the recorded study."""
    most = rounds.until_resolved.max
    seed_effect = rng.normal(0, spreads[baseline], most)
    draws = {label: {s: means[label] + seed_effect[s] + (0.0 if label == baseline else rng.normal(0, spreads[label]))
                     for s in range(most)} for label in means}
    fixed = outcomes(draws, baseline, margin, higher, Design((most,)))
    counts = {label: len(rounds.seeds) for label in means}
    looks = study_design(rounds)
    while True:
        seen = {label: {s: draws[label][s] for s in range(counts[label])} for label in means}
        adaptive = outcomes(seen, baseline, margin, higher, looks)
        following = next_counts(seen, baseline, adaptive, rounds)
        if following == counts:
            break
        counts = following
    same = sum(adaptive[label] == fixed[label] for label in fixed)
    small = {label for label in fixed
             if abs(np.mean([draws[label][s] - draws[baseline][s] for s in range(most)])) < margin}
    compatible = sum(adaptive[label] == fixed[label] or (label in small and {adaptive[label], fixed[label]} in
                     ({"equivalent", "better"}, {"equivalent", "worse"})) for label in fixed)
    return same, compatible, len(fixed), sum(counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a finished study directory")
    parser.add_argument("--replays", type=int, default=1000)
    parser.add_argument("--min-seeds", type=int, default=3)
    parser.add_argument("--max-seeds", type=int, default=12)
    parser.add_argument("--step", type=int, default=1, help="seeds added per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    means, spreads, baseline, margin, higher = fitted(args.study)
    rounds = validate(StudySpec, {"name": "replay", "seeds": {"min": args.min_seeds, "max": args.max_seeds, "step": args.step}}, "replay")
    rng = np.random.default_rng(args.seed)
    same = compatible = total = runs = 0
    for _ in range(args.replays):
        agreed, fits, compared, trained = replay(rng, means, spreads, baseline, margin, higher, rounds)
        same, compatible, total, runs = same + agreed, compatible + fits, total + compared, runs + trained
    grid_runs = args.replays * len(means) * args.max_seeds
    agreement, share, compatible_share = same / total, runs / grid_runs, compatible / total
    print(f"{args.study}: {len(means)} configurations, baseline {baseline}, margin ±{margin:g}, {args.replays} replays")
    for label in means:
        print(f"  {label:<28} mean {means[label]:.4f}  sd of differences {spreads[label]:.4f}")
    print(f"same verdict as the fixed {args.max_seeds}-seed grid: {100 * agreement:.1f}% of comparisons "
          f"(compatible: {100 * compatible_share:.1f}%); runs trained: {100 * share:.1f}% of the grid's")
    append_result("time_to_answer", {"study": str(args.study), "replays": args.replays, "min_seeds": args.min_seeds,
                                     "max_seeds": args.max_seeds, "step": args.step, "margin": margin, "means": means,
                                     "spreads": spreads, "agreement": agreement, "compatible": compatible_share,
                                     "share_of_runs": share})


if __name__ == "__main__":
    main()
