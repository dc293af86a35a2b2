"""Successive halving of a study's tuning runs (`tune.rungs`), decided from its stored runs.

Every candidate rate of a configuration (with `tune.grid` or `tune.sample`, every point: a rate with a value of
each other tuned setting)
trains (with each tuning seed) to the first rung, a fraction of the full run's steps on the full run's learning-rate
schedule (`train.stop_at`). Once all of them are there, the rates are
ranked by their mean validation metric: a rate whose runs are degenerate there stops at once, and of the others
the best `tune.keep` share (at least one) continues to the next rung, the rest stop for good (where every rate
is degenerate, it is too early to tell them apart: all continue). After the last rung
the survivors train to the end, resuming from their checkpoints, so their results are an uninterrupted run's.

The decisions are a function of the stored rows alone (the rung results a promoted run passed are kept in the
store's `rungs`), so a study resumed after a kill takes the same ones. Only validation metrics are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peftlab.records.degenerate import degenerate_reason
from peftlab.records.results import Snapshot, flat_result, primary_metric
from peftlab.specs import TuneSpec

WAITING = "waiting"


@dataclass
class Halving:
    promote: dict[str, float | None] = field(default_factory=dict)  # run id -> its next stop (None: to the end)
    stopped: dict[tuple, str] = field(default_factory=dict)  # point (`point_of`) -> where it stopped, and why
    decided: bool = True  # every rung whose runs are all there has been decided; False while runs train to one


def halving(tune: TuneSpec, snapshot: Snapshot) -> dict[str, Halving]:
    """Per configuration label, the rung decisions its tuning runs allow so far."""
    rows = [r for r in snapshot.rows if r["phase"] == "tune"]
    if not rows or not (tune.rungs or any(r["status"] == "stopped" for r in rows)):
        return {}
    metric, higher = primary_metric(rows, split="validation")
    by_label: dict[str, dict[tuple, list[dict[str, Any]]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], {}).setdefault(point_of(snapshot.configs[row["id"]], tune), []).append(row)
    return {label: _label_halving(tune, rates, snapshot, metric, higher) for label, rates in by_label.items()}


def _label_halving(tune: TuneSpec, rates: dict[tuple, list[dict[str, Any]]], snapshot: Snapshot, metric: str,
                   higher: bool) -> Halving:
    out = Halving()
    for run in (run for runs in rates.values() for run in runs):  # stopped at a rung the spec no longer has
        stop = _stop_of(run, snapshot)
        if run["status"] == "stopped" and stop not in tune.rungs:
            out.promote[run["id"]] = next((f for f in tune.rungs if f > (stop or 0)), None)
    if out.promote:
        return out  # the rungs are decided once those runs reach them
    alive = sorted(rates)
    for k, at in enumerate(tune.rungs):
        states = {rate: [_at_rung(run, at, snapshot) for run in rates[rate]] for rate in alive}
        if any(state == WAITING for runs in states.values() for state in runs):
            out.decided = False
            return out
        scores, degenerate = {}, {}
        for rate, runs in states.items():
            scored = [r for r in runs if r is not None]
            values = [r.get(metric) for r in scored if _finite(r.get(metric))]
            if values:
                scores[rate] = sum(values) / len(values)
            reasons = [degenerate_reason(r, split="validation") for r in scored]
            if scored and all(reasons):
                degenerate[rate] = reasons[0]
        kept = _kept(scores, degenerate, tune.keep, higher, len(alive))
        for rate in alive:
            if rate not in kept:
                why = degenerate.get(rate) or (f"{scores[rate]:.4f}; the best {len(kept)} of {len(alive)} went on"
                                               if rate in scores else "every run failed")
                out.stopped[rate] = f"stopped at {at:.0%} ({why})"
        following = tune.rungs[k + 1] if k + 1 < len(tune.rungs) else None
        for rate in kept:
            for run in rates[rate]:
                if run["status"] == "stopped" and _stop_of(run, snapshot) == at:
                    out.promote[run["id"]] = following
        alive = kept
    return out


def point_of(config: dict[str, Any], tune: TuneSpec | None) -> tuple:
    """A tuning run's point, read from its config: its rate, then its values of `tune.paths` (in order)."""
    point = [config.get("train", {}).get("lr")]
    for path in tune.paths if tune is not None else []:
        node: Any = config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        point.append(node)
    return tuple(point)


def tuning_steps(snapshot: Snapshot) -> tuple[int, int] | None:
    """(optimizer steps the tuning runs trained, steps they would have trained to the end), over the tuning runs
    that recorded both; None without any."""
    rows = [r for r in snapshot.rows if r["phase"] == "tune" and r["status"] in ("done", "stopped")
            and _finite(r.get("cost.steps")) and _finite(r.get("cost.planned_steps"))]
    if not rows:
        return None
    return int(sum(r["cost.steps"] for r in rows)), int(sum(r["cost.planned_steps"] for r in rows))


def _kept(scores: dict[tuple, float], degenerate: dict[tuple, str], keep: float, higher: bool, n: int) -> list[tuple]:
    """The rates that continue: the best ceil(keep x n) (at least one) of those scored and not degenerate. Where
    every scored rate is degenerate (too early for any to have learnt: the majority class everywhere), the rung
    decides nothing and all of them continue."""
    sign = -1 if higher else 1
    ranked = sorted(scores, key=lambda rate: (sign * scores[rate], rate))
    healthy = [rate for rate in ranked if rate not in degenerate]
    count = max(1, math.ceil(keep * n - 1e-9))
    return sorted(healthy[:count] if healthy else ranked)


def _at_rung(run: dict[str, Any], at: float, snapshot: Snapshot) -> dict[str, Any] | None | str:
    """The run's flat result at the rung `at`; None where it failed; WAITING where it has not reached it."""
    for passed in snapshot.rungs.get(run["id"], []):
        if passed.get("at") == at:
            return flat_result(passed["result"])
    if run["status"] == "failed":
        return None
    if run["status"] == "stopped" and _stop_of(run, snapshot) == at:
        return run
    if run["status"] == "done":  # trained to the end without stopping (halving added later): its final scores
        return run
    return WAITING


def _stop_of(run: dict[str, Any], snapshot: Snapshot) -> float | None:
    return snapshot.configs[run["id"]].get("train", {}).get("stop_at")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
