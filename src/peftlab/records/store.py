"""The study store: one SQLite database (WAL) in the study directory, one row per run.

Every change is one committed statement, so a kill at any moment leaves the database consistent and
loses at most the runs in flight; a row left `running` by a dead process is recovered on resume.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import PeftlabError
from peftlab.files import check_output

if TYPE_CHECKING:
    from peftlab.studies.grid import PlannedRun

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    label TEXT NOT NULL,
    seed INTEGER NOT NULL,
    axes TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'stopped')),
    attempts INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    result TEXT,
    error TEXT,
    phase TEXT NOT NULL DEFAULT 'main',
    rungs TEXT
)
"""
# `stopped`: a tuning run at a rung of successive halving (its result: the validation scores there); promoted, it
# is pending again with its next stop, and `rungs` keeps the results of the rungs it passed.


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (finished, not yet reaped) counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


COLUMNS = {"id", "grp", "label", "seed", "axes", "config", "status", "attempts", "pid", "created", "started",
           "finished", "result", "error"}


class Store:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.db = sqlite3.connect(path, timeout=60, isolation_level=None)  # autocommit: one statement, one commit
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=60000")
            self.db.execute(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        except sqlite3.DatabaseError as exc:
            raise PeftlabError(f"{path}: not a readable study database ({exc}); it was left as it is. Restore it from "
                               "a backup, or move the study directory aside and run the study again in a new one"
                               ) from None
        if not COLUMNS <= columns:
            raise PeftlabError(f"{path}: its runs table lacks {', '.join(sorted(COLUMNS - columns))}; not a peftlab "
                               "study database (left as it is)")
        if "phase" not in columns:  # a study created before tuning runs existed: all its runs are results
            self.db.execute("ALTER TABLE runs ADD COLUMN phase TEXT NOT NULL DEFAULT 'main'")
        if "rungs" not in columns:
            self._add_stopped_status()

    def _add_stopped_status(self) -> None:
        """A study created before successive halving: its table rebuilt, in one transaction, with the status
        `stopped` allowed and the `rungs` column (a CHECK constraint cannot be altered in place)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("ALTER TABLE runs RENAME TO runs_before_rungs")
            self.db.execute(SCHEMA)
            kept = ", ".join(sorted(COLUMNS | {"phase"}))
            self.db.execute(f"INSERT INTO runs ({kept}) SELECT {kept} FROM runs_before_rungs")
            self.db.execute("DROP TABLE runs_before_rungs")

    def close(self) -> None:
        self.db.close()

    def add(self, runs: Iterable[PlannedRun]) -> int:
        """Insert new runs (invalid configs go straight to failed); existing ids are kept as they are."""
        rows = [
            (r.id, r.group, r.label, r.seed, json.dumps(r.axes), json.dumps(r.config),
             "failed" if r.error else "pending", time.time(), r.error, r.phase)
            for r in runs
        ]
        before = self.count()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT OR IGNORE INTO runs (id, grp, label, seed, axes, config, status, created, error, phase) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return self.count() - before

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        return {status: n for status, n in rows}

    def get(self, run_id: str) -> sqlite3.Row:
        return self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()

    def rows(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM runs ORDER BY label, seed").fetchall()

    def stale(self) -> list[sqlite3.Row]:
        """Rows marked running whose process is gone (a killed study or worker)."""
        rows = self.db.execute("SELECT * FROM runs WHERE status = 'running'").fetchall()
        return [r for r in rows if not pid_alive(r["pid"])]

    def reset(self, run_id: str) -> None:
        self.db.execute("UPDATE runs SET status = 'pending', pid = NULL WHERE id = ?", (run_id,))

    def mark_running(self, run_id: str, pid: int | None) -> None:
        self.db.execute(
            "UPDATE runs SET status = 'running', pid = ?, started = ?, attempts = attempts + 1, error = NULL "
            "WHERE id = ?",
            (pid, time.time(), run_id),
        )

    def set_pid(self, run_id: str, pid: int) -> None:
        self.db.execute("UPDATE runs SET pid = ? WHERE id = ?", (pid, run_id))

    def finish(self, run_id: str, status: str, result: dict[str, Any] | None, error: str | None) -> None:
        self.db.execute(
            "UPDATE runs SET status = ?, result = ?, error = ?, finished = ?, pid = NULL WHERE id = ?",
            (status, json.dumps(result) if result is not None else None, error, time.time(), run_id),
        )

    def promote(self, run_id: str, config: dict[str, Any]) -> bool:
        """A run stopped at a rung continues (pending again) under `config` (its next stop, or none); the rung's
        result joins its `rungs`. False where the run was not stopped (already promoted)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.get(run_id)
            if row is None or row["status"] != "stopped":
                return False
            at = json.loads(row["config"]).get("train", {}).get("stop_at")
            rungs = json.loads(row["rungs"] or "[]") + [{"at": at, "result": json.loads(row["result"] or "null")}]
            self.db.execute("UPDATE runs SET status = 'pending', config = ?, rungs = ?, result = NULL WHERE id = ?",
                            (json.dumps(config), json.dumps(rungs), run_id))
        return True

    def current_groups(self) -> dict[str, str]:
        """Label -> the group of its seed runs that was added last. An edited spec keeps the runs of its earlier
        version; where an edit changed what a label trains, the label now means the newer configuration."""
        latest: dict[str, tuple[float, str]] = {}
        for row in self.db.execute("SELECT label, grp, created FROM runs WHERE phase = 'main'"):
            if row["label"] not in latest or row["created"] > latest[row["label"]][0]:
                latest[row["label"]] = (row["created"], row["grp"])
        return {label: group for label, (_, group) in latest.items()}

    def integrity(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]


def open_existing(study_dir: Path) -> Store:
    """The store of a study that exists; a clear error otherwise."""
    if not (study_dir / "study.db").is_file():
        raise PeftlabError(f"{study_dir}: not a study directory (no study.db)")
    return Store(study_dir / "study.db")


def check_study_dir(study_dir: Path) -> None:
    """`study_dir` can hold a study: a new directory, an empty one, or a study's (before anything is written)."""
    check_output(study_dir, "--dir", directory=True)
    if (study_dir / "study.db").exists():
        Store(study_dir / "study.db").close()  # readable, or an error that leaves it as it is
    elif study_dir.is_dir() and any(study_dir.iterdir()):
        raise PeftlabError(f"--dir {study_dir}: exists, is not empty and holds no study (no study.db); choose a new "
                           "or empty directory")


def run_dir(study_dir: Path, run_id: str) -> Path:
    """Where a study's run writes its outputs (result, adapter, samples)."""
    return study_dir / "runs" / run_id
