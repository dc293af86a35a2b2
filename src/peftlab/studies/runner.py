"""Running a study: check it, store its runs, recover what a kill left, then a scheduler (which runs, in what
order: `studies.scheduler`) feeds an executor (where they run: `studies.executors`), with progress shown."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from peftlab.errors import PeftlabError
from peftlab.files import write_atomic
from peftlab.records.store import Store, check_study_dir, run_dir
from peftlab.specs import StudySpec
from peftlab.studies.executors import Executor, make_executor
from peftlab.studies.pinning import enforce
from peftlab.studies.preview import check_configurations
from peftlab.studies.scheduler import Scheduler, add_runs
from peftlab.train.result import RunResult


@contextmanager
def study_lock(study_dir: Path):
    """One study process per directory."""
    handle = (study_dir / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PeftlabError(f"{study_dir}: another peftlab study is running on this directory") from None
    try:
        yield
    finally:
        handle.close()


def open_study(spec: StudySpec, study_dir: Path) -> tuple[Store, int]:
    """Create or update the study: save the spec, add its new runs, keep the old ones."""
    study_dir.mkdir(parents=True, exist_ok=True)
    store = Store(study_dir / "study.db")  # first: a corrupt database stops the study before anything changes
    (study_dir / "runs").mkdir(exist_ok=True)
    (study_dir / "logs").mkdir(exist_ok=True)
    write_atomic(study_dir / "study.yaml", spec.to_yaml())
    return store, add_runs(spec, store, study_dir)


def recover(store: Store, study_dir: Path) -> int:
    """Rows left `running` by a dead process: adopt a run that finished writing its directory
    (killed between the rename and the store update), otherwise run it again."""
    recovered = 0
    for row in store.stale():
        result_file = run_dir(study_dir, row["id"]) / "result.json"
        if result_file.is_file():
            result = RunResult.from_dict(json.loads(result_file.read_text()))
            store.finish(row["id"], result.status, result.stored(), result.error)
        else:
            store.reset(row["id"])
        recovered += 1
    return recovered


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[state]}"), TimeElapsedColumn(), TimeRemainingColumn())


def run_study(spec: StudySpec, study_dir: Path, *, jobs: int = 1, executor: str | Executor = "local",
              address: str | None = None, retry_failed: bool = False, threads: int | None = None, gpus: float = 0.0,
              rerun_changed: bool = False) -> Store:
    """Run every run of the study not yet done (`retry_failed`: the failed ones too). `executor`: "local", "ray",
    or an `Executor`."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    if isinstance(executor, str):  # a bad setting is refused before anything is written
        executor = make_executor(executor, jobs, threads, gpus, address)
    check_study_dir(study_dir)
    check_configurations(spec)
    study_dir.mkdir(parents=True, exist_ok=True)
    with study_lock(study_dir):
        if (study_dir / "study.db").is_file():  # before anything is written: changed inputs stop the study
            _check_inputs(study_dir, rerun_changed)
        store, added = open_study(spec, study_dir)
        recovered = recover(store, study_dir)
        counts = store.counts()
        with _progress() as progress:
            bar = progress.add_task(f"study {spec.name}",
                                    state=f"{added} new, {recovered} recovered, {counts.get('done', 0)} done before")

            def on_finished(run_id: str, added: int) -> None:
                now = store.counts()
                progress.update(bar, advance=1, total=progress.tasks[bar].total + added,
                                state=f"{now.get('done', 0)} done, {now.get('failed', 0)} failed" + (
                                    f", {now['stopped']} stopped at a rung" if now.get("stopped") else ""))

            scheduler = Scheduler(spec, store, study_dir, retry_failed, on_finished)
            ids = scheduler.first()
            progress.update(bar, total=len(ids))
            if ids:
                executor.run(store, study_dir, ids, scheduler.after)
    return store


def _check_inputs(study_dir: Path, rerun_changed: bool) -> None:
    existing = Store(study_dir / "study.db")
    try:
        check = enforce(existing, str(study_dir), rerun_changed)
    finally:
        existing.close()
    if check.unchecked:
        Console(stderr=True).print(f"note: {check.unchecked} finished run(s) recorded no input fingerprints "
                                   "(an older peftlab): reused, their inputs could not be checked", highlight=False)
