"""What stopping for futility saves and costs, by simulation: the same studies with and without it.

Each setting simulates studies of 3 comparisons against a baseline (`peftlab.studies.simulate`: no training), once
with `seeds.futility: 0.1` and once with 0, on the same random draws, so every difference between the two columns
is the rule's. Settings: the look schedules (3, 6) and (3, 6, 9, 12); a paired spread per seed like the demo's
(about 0.02 accuracy) and half of it; true differences 0, margin/2, the margin (0.02) and twice the margin. It
prints, per setting: false better / worse, false equivalent, seed runs per study and the share of comparisons
resolved, without -> with futility.

    python benchmarks/futility.py                 # 2,000 studies per setting (~15 min on 2 cores)
    python benchmarks/futility.py --studies 500 --no-record
"""

from __future__ import annotations

import argparse

import numpy as np
from common import append_result

from peftlab.config import validate
from peftlab.specs import StudySpec
from peftlab.studies.simulate import simulate_study

MARGIN = 0.02
SCHEDULES = {"3,6": (6, 3), "3,6,9,12": (12, 3)}


def rates(futility: float, maximum: int, step: int, difference: float, noise: float, studies: int) -> dict[str, float]:
    spec = validate(StudySpec, {"name": "s", "seeds": {"min": 3, "max": maximum, "step": step, "futility": futility}},
                    "futility benchmark")
    rng = np.random.default_rng(7)
    results = [simulate_study(rng, spec, [difference] * 3, MARGIN, seed_sd=0.03, noise_sd=noise) for _ in range(studies)]
    return {"false_difference": float(np.mean([r.false_difference for r in results])),
            "false_equivalence": float(np.mean([r.false_equivalence for r in results])),
            "runs": float(np.mean([r.runs for r in results])),
            "resolved": float(np.mean([r.resolved for r in results]) / 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/results")
    args = parser.parse_args()
    for schedule, (maximum, step) in SCHEDULES.items():
        for noise in (0.007, 0.015):  # per configuration; a paired difference's spread is sqrt(2) times it
            for difference in (0.0, MARGIN / 2, MARGIN, 2 * MARGIN):
                off = rates(0.0, maximum, step, difference, noise, args.studies)
                on = rates(0.1, maximum, step, difference, noise, args.studies)
                line = ", ".join(f"{k} {off[k]:.3f} -> {on[k]:.3f}" if k != "runs" else f"runs {off[k]:.2f} -> {on[k]:.2f}"
                                 for k in off)
                print(f"looks {schedule}, paired sd {noise * 2 ** 0.5:.3f}, true difference {difference:g}: {line}",
                      flush=True)
                if not args.no_record:
                    append_result("futility", {"looks": schedule, "paired_sd": noise * 2 ** 0.5, "difference": difference,
                                               "studies": args.studies, "without": off, "with": on})


if __name__ == "__main__":
    main()
