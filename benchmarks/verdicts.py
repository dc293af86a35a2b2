"""The error rates of verdicts, by simulation: false better / worse, false equivalent, and runs per study.

For 4 comparisons against a baseline and the look schedules (3, 6), (3, 6, 9, 12) and 3..12, it simulates
studies (`peftlab.studies.simulate`: no training) in three settings:
- null: every true difference 0; any "better" or "worse" is false;
- margin: every true difference equals the margin; any "equivalent" is false;
- mixed: true differences 0, margin/2, margin and 2 x margin (the runs a realistic study spends);
under the current rules (Holm over sequential p-values for better / worse, Holm over sequential TOST p-values
with the pooled-spread rule for equivalence) and under the rules before them (TOST per comparison at the
one-sided level per look, no correction across comparisons, own spread only). Each rate comes with a 95%
Wilson interval. It also checks the sequential p-values against an independent, larger simulation.

    python benchmarks/verdicts.py                       # 10,000 studies per setting (~15 min on 2 cores)
    python benchmarks/verdicts.py --studies 2000 --no-record
    python benchmarks/verdicts.py --studies 20000 --looks 3,6,9,12 --settings null --rules current
"""

from __future__ import annotations

import argparse
import math
import time
import zlib

import numpy as np
from common import append_result
from scipy import stats

from peftlab.analysis.sequential import Design
from peftlab.analysis.stats import adjusted, compare, equivalent
from peftlab.config import validate
from peftlab.specs import StudySpec
from peftlab.studies.adaptive import outcomes
from peftlab.studies.simulate import simulate_study

SCHEDULES = {"3,6": (3, 6, 3), "3,6,9,12": (3, 12, 3), "3..12": (3, 12, 1)}
MARGIN = 0.02


def previous_outcomes(quality, baseline, margin, higher_is_better, design: Design) -> dict[str, str]:
    """The rules before: better / worse as now; equivalent by TOST per comparison at the one-sided level per
    look, on its own spread, with no correction across comparisons."""
    others = [label for label in quality if label != baseline]
    comparisons = [compare(quality[label], quality[baseline]) for label in others]
    result = {}
    for label, c, p in zip(others, comparisons, adjusted(comparisons, design)):
        if not math.isnan(p) and p < design.alpha:
            result[label] = "better" if (c.difference > 0) == higher_is_better else "worse"
        else:
            result[label] = "equivalent" if equivalent(c, margin, design.level(sided=1)) else "unresolved"
    return result


def wilson(successes: int, n: int) -> tuple[float, float]:
    z = 1.959964
    centre = (successes + z * z / 2) / (n + z * z)
    half = z * math.sqrt(successes * (n - successes) / n + z * z / 4) / (n + z * z)
    return centre - half, centre + half


def run_setting(spec: StudySpec, differences: list[float], studies: int, rules, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    results = [simulate_study(rng, spec, differences, MARGIN, noise_sd=0.015, judge=rules) for _ in range(studies)]
    out = {"studies": studies, "runs_per_study": float(np.mean([r.runs for r in results]))}
    for name in ("false_difference", "false_equivalence"):
        count = sum(getattr(r, name) for r in results)
        low, high = wilson(count, studies)
        out[name] = {"rate": count / studies, "ci95": [round(low, 5), round(high, 5)]}
    return out


def reference_check(simulations: int) -> list[dict]:
    """Sequential p-values of looks (3, 6) against an independent simulation (another seed)."""
    design = Design((3, 6))
    rng = np.random.default_rng(987654321)
    smallest = np.ones(simulations)
    for start in range(0, simulations, 500_000):
        d = rng.standard_normal((min(500_000, simulations - start), 6))
        t = [d[:, :n].mean(1) / (d[:, :n].std(1, ddof=1) / math.sqrt(n)) for n in (3, 6)]
        smallest[start:start + len(d)] = np.minimum(2 * stats.t.sf(np.abs(t[0]), 2), 2 * stats.t.sf(np.abs(t[1]), 5))
    rows = []
    for p in (0.0001, 0.0005, 0.001, 0.005, 0.0271):
        estimate = float(np.mean(smallest <= p))
        rows.append({"p": p, "sequential": design.p(p), "independent": estimate,
                     "independent_se": math.sqrt(estimate * (1 - estimate) / simulations)})
    return rows


SETTINGS = {"null": [0.0] * 4, "margin": [MARGIN] * 4, "mixed": [0.0, MARGIN / 2, MARGIN, 2 * MARGIN]}
RULES = {"current": outcomes, "previous": previous_outcomes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--reference-simulations", type=int, default=10_000_000)
    parser.add_argument("--looks", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/results")
    args = parser.parse_args()
    rows = []
    for schedule in args.looks:
        first, most, step = SCHEDULES[schedule]
        spec = validate(StudySpec, {"name": "sim", "seeds": {"min": first, "max": most, "step": step}}, "benchmark")
        for setting in args.settings:
            differences = SETTINGS[setting]
            for rule_name in args.rules:
                rules = RULES[rule_name]
                started = time.perf_counter()
                result = run_setting(spec, differences, args.studies, rules, seed=zlib.crc32(f"{schedule}|{setting}".encode()))
                rows.append({"looks": schedule, "setting": setting, "rules": rule_name, **result,
                             "seconds": round(time.perf_counter() - started, 1)})
                fd, fe = result["false_difference"], result["false_equivalence"]
                print(f"looks {schedule:9} {setting:6} {rule_name:8}  false better/worse {fd['rate']:.4f} "
                      f"[{fd['ci95'][0]:.4f}, {fd['ci95'][1]:.4f}]  false equivalent {fe['rate']:.4f} "
                      f"[{fe['ci95'][0]:.4f}, {fe['ci95'][1]:.4f}]  runs/study {result['runs_per_study']:.2f}", flush=True)
    reference = reference_check(args.reference_simulations) if args.reference_simulations else []
    for r in reference:
        print(f"p={r['p']:<7g} sequential {r['sequential']:.6f}  independent {r['independent']:.6f} "
              f"± {r['independent_se']:.6f}")
    if not args.no_record:
        append_result("verdicts", {"comparisons": 4, "margin": MARGIN, "seed_sd": 0.03, "noise_sd": 0.015,
                                   "settings": rows, "sequential_reference": reference})


if __name__ == "__main__":
    main()
