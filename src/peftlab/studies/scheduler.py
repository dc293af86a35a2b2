"""Which runs a study has and which to start next, decided from its stored runs (an executor, `studies.executors`,
runs them).

The spec's runs become known as the stored results allow: every tuning run at once; a configuration's seed runs
once its tuning runs are done and its rate is chosen (`records.tuning`); with seeds until resolved, each further
round once every run of the round before is done (`studies.adaptive`). With successive halving (`tune.rungs`),
the tuning runs a rung keeps are started again to the next one, and the checkpoints of those it stops are
removed (`records.halving`). Runs start in the order the store keeps: when they became known, then by label and seed.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

from peftlab.records.halving import halving, point_of
from peftlab.records.results import Snapshot
from peftlab.records.store import Store, run_dir
from peftlab.records.tuning import chosen_points
from peftlab.specs import StudySpec
from peftlab.studies.adaptive import seed_counts
from peftlab.studies.grid import PlannedRun, expand


def known_runs(spec: StudySpec, snapshot: Snapshot, study_dir: Path) -> list[PlannedRun]:
    """Every run the stored runs make known: the tuning runs, the seed runs of each configuration whose rate is
    chosen, and with seeds until resolved, the seeds each configuration should have at this look."""
    return expand(spec, chosen_points(snapshot, spec.tune) if spec.tune else None,
                  seed_counts(spec, snapshot, study_dir))


def add_runs(spec: StudySpec, store: Store, study_dir: Path) -> int:
    """Apply the rung decisions the stored runs allow, then store the runs known so far; how many were new."""
    halve(spec, store, study_dir)
    return store.add(known_runs(spec, Snapshot.of(store), study_dir))


def halve(spec: StudySpec, store: Store, study_dir: Path) -> list[str]:
    """Successive halving's decisions so far (none without `tune.rungs`): the tuning runs a rung keeps are pending
    again with their next stop (their ids returned); the checkpoints of those it stops for good are removed."""
    if spec.tune is None:
        return []
    snapshot = Snapshot.of(store)
    plans, promoted = halving(spec.tune, snapshot), []
    for plan in plans.values():
        for run_id, following in plan.promote.items():
            config = copy.deepcopy(snapshot.configs[run_id])
            config["train"].pop("stop_at", None)
            if following is not None:
                config["train"]["stop_at"] = following
            if store.promote(run_id, config):
                promoted.append(run_id)
    for row in snapshot.rows:  # stopped for good: their checkpoints go
        plan = plans.get(row["label"])
        if plan and row["status"] == "stopped" and point_of(snapshot.configs[row["id"]], spec.tune) in plan.stopped:
            partial = run_dir(study_dir, row["id"])
            shutil.rmtree(partial.with_name(partial.name + ".partial"), ignore_errors=True)
    return promoted


class Scheduler:
    """The runs to start: those waiting when the study starts, then after each finished run, the runs it made
    known (each once). `on_finished(run_id, added)` hears of each finished run (a progress bar)."""

    def __init__(self, spec: StudySpec, store: Store, study_dir: Path, retry_failed: bool = False,
                 on_finished: Callable[[str, int], None] = lambda run_id, added: None) -> None:
        self.spec, self.store, self.study_dir = spec, store, study_dir
        self.retry_failed, self.on_finished = retry_failed, on_finished
        self.started: set[str] = set()

    def first(self) -> list[str]:
        ids = waiting(self.store, ("pending", "failed") if self.retry_failed else ("pending",))
        self.started.update(ids)
        return ids

    def after(self, run_id: str) -> list[str]:
        self.started.difference_update(halve(self.spec, self.store, self.study_dir))  # they start again
        self.store.add(known_runs(self.spec, Snapshot.of(self.store), self.study_dir))
        new = [i for i in waiting(self.store, ("pending",)) if i not in self.started]
        self.started.update(new)
        self.on_finished(run_id, len(new))
        return new


def waiting(store: Store, statuses: tuple[str, ...]) -> list[str]:
    """The ids of runs in `statuses`, in the order they start: as they became known (tuning before the seed runs
    it decided, a round of seeds before the next), then by label and seed."""
    rows = [r for r in store.rows() if r["status"] in statuses]
    return [r["id"] for r in sorted(rows, key=lambda r: (r["created"], r["label"], r["seed"]))]
