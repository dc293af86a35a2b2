"""Running a study: expand, store, recover what a kill left, execute locally or on Ray, show progress.

Local execution starts every run in a fresh process, forked from a server that has done the imports
(a crash or out-of-memory in one run cannot take the study down); Ray execution makes every run a task
with declared CPU/GPU resources.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import time
from collections.abc import Callable
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
from peftlab.records.tuning import chosen_rates
from peftlab.specs import StudySpec
from peftlab.studies.adaptive import seed_counts
from peftlab.studies.grid import expand
from peftlab.studies.pinning import enforce
from peftlab.studies.preview import check_configurations
from peftlab.studies.worker import (
    PRELOAD,
    execute_parallel_study_run,
    execute_study_run,
    run_process,
)
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


def add_runs(spec: StudySpec, store: Store, study_dir: Path | None = None) -> int:
    """Add the runs known so far: with tuning, the seed runs of each configuration whose rate is chosen;
    with seeds until resolved, the next round of seeds where a comparison is still unresolved."""
    counts = seed_counts(spec, store, study_dir) if study_dir is not None else None
    return store.add(expand(spec, chosen_rates(store) if spec.tune else None, counts))


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


def _processes() -> multiprocessing.context.BaseContext:
    """Run processes forked from a server that has imported PRELOAD (spawned where fork is unavailable)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))  # read when the server starts: the first study of this process
    return context


def run_local(store: Store, study_dir: Path, ids: list[str], jobs: int, threads: int,
              on_done: Callable[[], list[str]]) -> None:
    """Run `ids`, `jobs` at a time, and the runs that `on_done` returns after each finished one."""
    processes = _processes()
    queue, running = list(ids), {}
    while queue or running:
        while queue and len(running) < jobs:
            run_id = queue.pop(0)
            log = study_dir / "logs" / f"{run_id}.log"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            store.mark_running(run_id, None)  # before the start: a kill in between leaves a stale row, not a twin
            process = processes.Process(target=run_process, args=(study_dir, run_id, threads, log, env),
                                        name=f"peftlab-run-{run_id}")
            process.start()
            store.set_pid(run_id, process.pid)
            running[run_id] = process
        time.sleep(0.2)
        for run_id, process in list(running.items()):
            code = process.exitcode
            if code is None:
                continue
            process.close()
            del running[run_id]
            if store.get(run_id)["status"] == "running":  # the worker died before recording anything
                store.finish(run_id, "failed", None, f"run process exited with code {code} "
                             f"(log: {study_dir / 'logs' / (run_id + '.log')})")
            queue.extend(on_done())


def _require_ray():
    try:
        import ray
    except ImportError:
        raise PeftlabError("--executor ray needs the ray extra: pip install 'peftlab[ray]'") from None
    return ray


def _ray_run(study_dir: str, run_id: str, config: dict, threads: int, processes: int):
    if processes > 1:  # one process per GPU the task holds
        return execute_parallel_study_run(Path(study_dir), run_id, config, threads, processes)
    return execute_study_run(Path(study_dir), run_id, config, threads)


def processes_per_run(gpus: float) -> int:
    """Processes a Ray run starts: one per GPU it declares when it declares several (a whole number)."""
    if gpus > 1 and gpus != int(gpus):
        raise PeftlabError(f"--gpus-per-run {gpus:g}: above 1 it is the number of GPUs (and processes) of each run, "
                           "so a whole number; fractions below 1 share a GPU between runs")
    return int(gpus) if gpus > 1 else 1


def run_ray(store: Store, study_dir: Path, ids: list[str], threads: int, gpus: float, address: str | None,
            on_done: Callable[[], list[str]]) -> None:
    """Run `ids` as Ray tasks, and the runs that `on_done` returns after each finished one."""
    ray = _require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    # max_calls=1: a fresh worker process per run, as in local execution. Ray sets a task's OMP_NUM_THREADS to its
    # num_cpus itself (a runtime_env saying the same cost 5 s per run to set up).
    task = ray.remote(num_cpus=threads, num_gpus=gpus, max_calls=1)(_ray_run)
    pending = {}

    def submit(run_ids: list[str]) -> None:
        for run_id in run_ids:
            config = json.loads(store.get(run_id)["config"])
            pending[task.remote(str(study_dir.resolve()), run_id, config, threads, processes_per_run(gpus))] = run_id
            store.mark_running(run_id, os.getpid())  # the study process owns Ray runs

    submit(ids)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            run_id = pending.pop(done[0])
            try:
                status, result, error = ray.get(done[0])
            except Exception as exc:  # the task's process died (e.g. out of memory)
                status, result, error = "failed", None, f"ray task failed: {str(exc).splitlines()[0]}"
            store.finish(run_id, status, result, error)
            submit(on_done())
    finally:
        if started_here:
            ray.shutdown()


def run_study(spec: StudySpec, study_dir: Path, *, jobs: int = 1, executor: str = "local", address: str | None = None,
              retry_failed: bool = False, threads: int | None = None, gpus: float = 0.0,
              rerun_changed: bool = False) -> Store:
    if jobs < 1:
        raise PeftlabError(f"--jobs must be >= 1, got {jobs}")
    if executor not in ("local", "ray"):  # before anything is written
        raise PeftlabError(f"--executor {executor!r}: valid executors are local and ray")
    if executor == "ray":
        _require_ray()
    processes_per_run(gpus)  # a bad value is refused before anything is written
    check_study_dir(study_dir)
    check_configurations(spec)
    study_dir.mkdir(parents=True, exist_ok=True)
    with study_lock(study_dir):
        if (study_dir / "study.db").is_file():  # before anything is written: changed inputs stop the study
            existing = Store(study_dir / "study.db")
            try:
                check = enforce(existing, str(study_dir), rerun_changed)
            finally:
                existing.close()
            if check.unchecked:
                Console(stderr=True).print(f"note: {check.unchecked} finished run(s) recorded no input fingerprints "
                                           "(an older peftlab): reused, their inputs could not be checked",
                                           highlight=False)
        store, added = open_study(spec, study_dir)
        recovered = recover(store, study_dir)
        ids = store.to_run(retry_failed)
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        counts = store.counts()
        state = f"{added} new, {recovered} recovered, {counts.get('done', 0)} done before"
        with _progress() as progress:
            bar = progress.add_task(f"study {spec.name}", total=len(ids), state=state)
            started = set(ids)

            def on_done() -> list[str]:
                """After each finished run: the runs it made known. A configuration's seed runs start as soon
                as its tuning runs are done (its rate is chosen); with seeds until resolved, the next round
                starts once every run of this one is done."""
                add_runs(spec, store, study_dir)
                new = [run_id for run_id in store.to_run(retry_failed=False) if run_id not in started]
                started.update(new)
                now = store.counts()
                progress.update(bar, advance=1, total=progress.tasks[bar].total + len(new),
                                state=f"{now.get('done', 0)} done, {now.get('failed', 0)} failed")
                return new

            if ids:
                if executor == "ray":
                    run_ray(store, study_dir, ids, threads, gpus, address, on_done)
                else:
                    run_local(store, study_dir, ids, jobs, threads, on_done)
    return store

