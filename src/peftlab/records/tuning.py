"""The learning rate of each configuration, chosen on the validation split from its tuning runs.

Every rate of the grid trains with each tuning seed; the rate with the best mean validation metric
(accuracy for classification, loss for instruction tuning) is the configuration's rate for its seed runs.
Only validation metrics are read: the test split, on which the study's verdicts rest, plays no part.
A rate whose runs all failed is never chosen; a choice at either end of the grid is flagged, since a
better rate may lie beyond it. With `tune.rungs`, rates stopped early by successive halving
(`records.halving`) are out of the choice, which is made among the rates that trained to the end.
With `tune.grid` or `tune.sample` a candidate is a point, a rate with a value of each other tuned setting, and
all of the best point's settings train the seed runs; everything above holds for points as for rates.

A configuration whose every tuning run collapsed on validation (one predicted class or value, a diverged loss:
`records.degenerate.collapse_reason`) did not train at any rate of the grid. It gets no seed runs: at the
tie-break rate they would measure the same failure, and the report says so instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peftlab.records.degenerate import collapse_reason
from peftlab.records.halving import halving, point_of
from peftlab.records.results import Snapshot, baseline_rank, default_baseline, primary_metric
from peftlab.specs import TuneSpec


@dataclass(frozen=True)
class RateChoice:
    """A configuration's tuning so far. A point is (rate, *the values of `tune.paths`); without a grid, (rate,)."""

    label: str  # the configuration
    metric: str  # e.g. metrics.validation.accuracy
    higher_is_better: bool
    scores: dict[tuple, float | None]  # point -> mean validation metric over the tuning seeds (None: all failed,
    # or stopped early)
    complete: bool  # every tuning run has finished (done or failed, or stopped for good at a rung)
    stopped: dict[tuple, str] = field(default_factory=dict)  # point -> where successive halving stopped it, and why
    untrained: str | None = None  # every tuning run collapsed on validation: how (then no seed runs)
    tune: TuneSpec | None = None  # the study's tuning (names the points); None: the rate alone

    @property
    def point(self) -> tuple | None:
        """The best point (ties: the smaller rate, then the grid's values in order); None while tuning runs are
        pending or when every one failed."""
        scored = [(point, score) for point, score in self.scores.items() if score is not None]
        if not self.complete or not scored:
            return None
        sign = 1 if self.higher_is_better else -1
        return min(scored, key=lambda item: (-sign * item[1], item[0]))[0]

    @property
    def rate(self) -> float | None:
        """The best point's learning rate."""
        return self.point[0] if self.point is not None else None

    def describe(self, point: tuple) -> str:
        """A point as the report names it: the rate alone (0.001), or each setting (lr 0.001, model.dropout 0.1)."""
        return self.tune.describe(point) if self.tune is not None else f"{point[0]:g}"

    @property
    def undecided(self) -> bool:
        """Every point scored the same (typically every one collapsed to the majority class): the choice is
        the tie-break, not evidence."""
        scored = [score for point, score in self.scores.items() if score is not None and point not in self.stopped]
        return self.complete and len(scored) > 1 and max(scored) - min(scored) < 1e-12

    @property
    def at_edge(self) -> bool:
        """The chosen point has a numeric setting (the rate, a grid value) at the smallest or the largest value
        tried: the best may lie outside the grid."""
        point = self.point
        if point is None or len(self.scores) < 2:
            return False
        for i, value in enumerate(point):
            tried = {p[i] for p in self.scores}
            if len(tried) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in tried) \
                    and value in (min(tried), max(tried)):
                return True
        return False


def rate_choices(snapshot: Snapshot, tune: TuneSpec | None = None) -> dict[str, RateChoice]:
    """Per configuration label, what its tuning runs show so far (`tune`: the study's, for its rungs)."""
    rows = [r for r in snapshot.rows if r["phase"] == "tune"]
    if not rows:
        return {}
    halved = halving(tune, snapshot) if tune is not None else {}
    points = {r["id"]: point_of(snapshot.configs[r["id"]], tune) for r in rows}
    metric, higher = primary_metric(rows, split="validation")
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    choices = {}
    for label, runs in by_label.items():
        values: dict[tuple, list[float]] = {}
        for run in runs:
            values.setdefault(points[run["id"]], [])
            score = run.get(metric)
            if run["status"] == "done" and isinstance(score, (int, float)) and math.isfinite(score):
                values[points[run["id"]]].append(score)
        scores = {point: (sum(v) / len(v) if v else None) for point, v in sorted(values.items())}
        plan = halved.get(label)
        stopped = plan.stopped if plan else {}
        complete = (plan is None or plan.decided and not plan.promote) and all(
            run["status"] in ("done", "failed") or (run["status"] == "stopped" and points[run["id"]] in stopped)
            for run in runs)
        choices[label] = RateChoice(label, metric, higher, scores, complete, dict(stopped),
                                    _untrained(runs) if complete else None, tune)
    return choices


def _untrained(runs: list[dict]) -> str | None:
    """How every one of a configuration's finished tuning runs collapsed on validation (the commonest reason), or
    None where one did not, or failed."""
    reasons = [collapse_reason(run, split="validation") if run["status"] in ("done", "stopped") else None
               for run in runs]
    if not reasons or not all(reasons):
        return None
    return max(sorted(set(reasons)), key=reasons.count)


def chosen_points(snapshot: Snapshot, tune: TuneSpec | None = None) -> dict[str, tuple | str]:
    """Label -> the chosen point (rate, *grid values), or why none could be chosen, for configurations whose tuning
    is complete; not those that collapsed at every point (`RateChoice.untrained`: no seed runs, `not_run`)."""
    out: dict[str, tuple | str] = {}
    choices = rate_choices(snapshot, tune)
    skipped = not_run(snapshot, choices)
    for label, choice in choices.items():
        if not choice.complete or label in skipped:
            continue
        what, sep = ("learning rate", ", ") if tune is None or not tune.beyond_the_rate else ("point", "; ")
        out[label] = choice.point if choice.point is not None else (
            f"tuning: every {what} of the grid failed ({sep.join(choice.describe(p) for p in choice.scores)})")
    return out


def not_run(snapshot: Snapshot, choices: dict[str, RateChoice]) -> dict[str, str]:
    """Label -> how its tuning runs collapsed, for the configurations that get no seed runs (`choices`: the
    snapshot's `rate_choices`): every tuning run collapsed on validation. Never the study's default baseline (every
    comparison needs it; where no configuration can be the default by its kind, none is skipped, since the report's
    fallback is chosen by cost)."""
    configs = {r["label"]: snapshot.configs[r["id"]] for r in snapshot.rows if r["phase"] == "tune"}
    if not any(baseline_rank(config) is not None for config in configs.values()):
        return {}
    keep = default_baseline(configs)
    return {label: c.untrained for label, c in choices.items() if c.untrained and label != keep}
