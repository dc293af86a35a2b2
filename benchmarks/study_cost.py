"""What a finished study spent, by phase: runs, optimizer steps and training seconds of its tuning runs (against
training every candidate to the end) and of its seed runs, and the wall time from its first run's start to its last
run's end. Compare a study before and after a change (successive halving, seeds until resolved) on the same
machine. No training happens here.

    python benchmarks/study_cost.py demo/placement
    python benchmarks/study_cost.py before/placement after/placement
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import append_result

from peftlab.records.halving import tuning_steps
from peftlab.records.results import Snapshot
from peftlab.records.store import open_existing


def study_cost(snapshot: Snapshot) -> dict[str, Any]:
    """Per phase (tune, main): runs by status, optimizer steps, training seconds; the tuning's steps against its
    full budget; the study's wall time."""
    out: dict[str, Any] = {}
    for phase in ("tune", "main"):
        rows = [r for r in snapshot.rows if r["phase"] == phase]
        statuses: dict[str, int] = {}
        for row in rows:
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
        out[phase] = {"runs": statuses, "steps": sum(r.get("cost.steps") or 0 for r in rows),
                      "train_seconds": sum(r.get("cost.train_seconds") or 0.0 for r in rows)}
    spent = tuning_steps(snapshot)
    out["tune"]["full_budget_steps"] = spent[1] if spent else None
    started = [r["started"] for r in snapshot.rows if r["started"]]
    finished = [r["finished"] for r in snapshot.rows if r["finished"]]
    out["wall_seconds"] = max(finished) - min(started) if started and finished else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", type=Path, nargs="+", help="finished study directories")
    args = parser.parse_args()
    for study in args.studies:
        store = open_existing(study)
        try:
            cost = study_cost(Snapshot.of(store))
        finally:
            store.close()
        tune, main_ = cost["tune"], cost["main"]
        full = f" of {tune['full_budget_steps']:,} to the end" if tune["full_budget_steps"] else ""
        wall = f"{cost['wall_seconds'] / 60:.1f} min" if cost["wall_seconds"] is not None else "?"
        print(f"{study}: wall {wall}")
        print(f"  tuning: runs {tune['runs']}, {tune['steps']:,} steps{full}, {tune['train_seconds']:.0f} s training")
        print(f"  seeds:  runs {main_['runs']}, {main_['steps']:,} steps, {main_['train_seconds']:.0f} s training")
        append_result("study_cost", {"study": str(study), **cost})


if __name__ == "__main__":
    main()
