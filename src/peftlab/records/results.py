"""Study results as flat rows, for `study status`, the analysis and CSV / Parquet export."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.measures import higher_is_better
from peftlab.records.store import Store
from peftlab.tasks.glue import GLUE, glue_task
from peftlab.tasks.kinds import primary_metric as kind_primary
from peftlab.train.result import RunResult


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, into)
    elif not isinstance(value, list):
        into[prefix] = value


def run_rows(store: Store) -> list[dict[str, Any]]:
    """One flat dict per run: identity, status, axes, metrics.*, cost.*, speed.*, environment.* (versions,
    device) and inputs.* (what each input field read, `peftlab.provenance`)."""
    rows = []
    for r in store.rows():
        row: dict[str, Any] = {
            "id": r["id"], "group": r["grp"], "label": r["label"], "seed": r["seed"], "status": r["status"],
            "attempts": r["attempts"], "started": r["started"], "finished": r["finished"], "error": r["error"],
            "phase": r["phase"],
        }
        _flatten("axis", json.loads(r["axes"]), row)
        row.update(flat_result(json.loads(r["result"]) if r["result"] else {"status": r["status"]}))
        glue = glue_task(json.loads(r["config"]).get("task"))
        row["benchmark"] = f"glue/{glue.name}" if glue else None
        rows.append(row)
    return rows


def flat_result(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored result's metrics.*, cost.*, speed.*, environment.* and inputs.* columns, and its task kind."""
    result = RunResult.from_dict(stored)
    written, row = result.to_dict(), {}
    for section in ("metrics", "cost", "speed", "environment", "inputs"):
        _flatten(section, written[section], row)
    row["kind"] = result.data.get("kind")
    return row


def baseline_rank(config: dict[str, Any]) -> float | None:
    """The rank of a configuration that can be a study's default baseline (LoRA on every linear layer of every layer
    at one uniform rank, default initialisation: the smallest rank's is the baseline), None for any other."""
    plan, method = config.get("plan", {}), config.get("method", {})
    placement, allocation = plan.get("placement", {}), plan.get("allocation", {})
    default = (placement.get("roles") in (None, "all") and placement.get("layers") == "all"
               and not placement.get("modules") and allocation.get("kind") == "uniform" and method.get("name") == "lora"
               and method.get("init", "default") == "default")
    return allocation.get("rank", math.inf) if default else None


def default_baseline(configs: dict[str, dict[str, Any]]) -> str | None:
    """Of configurations (label -> config, in the study's order), the default baseline: the uniform all-layer LoRA
    of the smallest rank, else the first."""
    ranks = [(rank, i) for i, config in enumerate(configs.values()) if (rank := baseline_rank(config)) is not None]
    labels = list(configs)
    return labels[min(ranks)[1]] if ranks else (labels[0] if labels else None)


@dataclass(frozen=True)
class Snapshot:
    """What a study's store holds at one moment, read at once: what the analysis, tuning and adaptive seeding
    decide from (so each is a function of it, testable without a database or processes)."""

    rows: list[dict[str, Any]]  # one flat row per run (`run_rows`)
    configs: dict[str, dict[str, Any]]  # run id -> its config
    current: dict[str, str]  # label -> its current group (runs an edited spec left behind are not compared)
    rungs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run id -> the rungs it passed
    # ({at: fraction, result: its stored result there}; successive halving, `records.halving`)

    @classmethod
    def of(cls, store: Store) -> Snapshot:
        stored = store.rows()
        return cls(run_rows(store), {r["id"]: json.loads(r["config"]) for r in stored}, store.current_groups(),
                   {r["id"]: json.loads(r["rungs"]) for r in stored if r["rungs"]})


def primary_metric(rows: list[dict[str, Any]], split: str = "test") -> tuple[str, bool]:
    """(column, higher is better) of the metric the runs are judged by: their GLUE task's (`tasks.glue`), else their
    task kind's (`TaskKind.primary`)."""
    benchmarks = {r.get("benchmark") for r in rows}
    glue = GLUE.get(benchmarks.pop().removeprefix("glue/")) if len(benchmarks) == 1 and None not in benchmarks else None
    name = glue.metrics[0] if glue else kind_primary({r["kind"] for r in rows if r["kind"]})
    return f"metrics.{split}.{name}", higher_is_better(name)


def export(store: Store, path: Path) -> Path:
    """Write every run to CSV or Parquet (by the file's suffix)."""
    import pandas as pd

    frame = pd.DataFrame(run_rows(store))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".csv":
        frame.to_csv(tmp, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    else:
        raise PeftlabError(f"{path}: export to .csv or .parquet")
    tmp.replace(path)
    return path
