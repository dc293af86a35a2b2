"""Where a study's runs execute. An executor runs the ids it is given and, after each finished one (recorded in
the store), the ids its `next_runs` callback returns; which runs exist and in what order is the scheduler's
(`studies.scheduler`).

- `LocalExecutor`: every run in a fresh process, forked from a server that has done the imports (a crash or
  out-of-memory in one run cannot take the study down), `jobs` at a time.
- `RayExecutor`: every run a Ray task with declared CPU/GPU resources, on a local or remote cluster.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from peftlab.errors import PeftlabError
from peftlab.records.store import Store
from peftlab.studies.worker import PRELOAD, execute_parallel_study_run, execute_study_run, run_process

NextRuns = Callable[[str], list[str]]
"""Called with the id of each run that finished: the ids to start next."""


class Executor(Protocol):
    def run(self, store: Store, study_dir: Path, ids: list[str], next_runs: NextRuns) -> None: ...


@dataclass(frozen=True)
class LocalExecutor:
    jobs: int = 1
    threads: int = 1  # each run's torch threads

    def run(self, store: Store, study_dir: Path, ids: list[str], next_runs: NextRuns) -> None:
        processes = _processes()
        queue, running = list(ids), {}
        while queue or running:
            while queue and len(running) < self.jobs:
                run_id = queue.pop(0)
                log = study_dir / "logs" / f"{run_id}.log"
                env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
                store.mark_running(run_id, None)  # before the start: a kill in between leaves a stale row, not a twin
                process = processes.Process(target=run_process, args=(study_dir, run_id, self.threads, log, env),
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
                queue.extend(next_runs(run_id))


def _processes() -> multiprocessing.context.BaseContext:
    """Run processes forked from a server that has imported PRELOAD (spawned where fork is unavailable)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))  # read when the server starts: the first study of this process
    return context


@dataclass(frozen=True)
class RayExecutor:
    threads: int = 1  # each task's CPUs
    gpus: float = 0.0  # each task's GPUs: a fraction shares one, a whole number above 1 starts a process per GPU
    address: str | None = None  # a running cluster's; None starts one on this machine

    def __post_init__(self) -> None:
        require_ray()
        processes_per_run(self.gpus)

    def run(self, store: Store, study_dir: Path, ids: list[str], next_runs: NextRuns) -> None:
        ray = require_ray()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        # max_calls=1: a fresh worker process per run, as in local execution. Ray sets a task's OMP_NUM_THREADS to
        # its num_cpus itself (a runtime_env saying the same cost 5 s per run to set up).
        task = ray.remote(num_cpus=self.threads, num_gpus=self.gpus, max_calls=1)(_ray_run)
        pending = {}

        def submit(run_ids: list[str]) -> None:
            for run_id in run_ids:
                config = json.loads(store.get(run_id)["config"])
                pending[task.remote(str(study_dir.resolve()), run_id, config, self.threads,
                                    processes_per_run(self.gpus))] = run_id
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
                submit(next_runs(run_id))
        finally:
            if started_here:
                ray.shutdown()


def _ray_run(study_dir: str, run_id: str, config: dict, threads: int, processes: int):
    if processes > 1:  # one process per GPU the task holds
        return execute_parallel_study_run(Path(study_dir), run_id, config, threads, processes)
    return execute_study_run(Path(study_dir), run_id, config, threads)


def require_ray():
    try:
        import ray
    except ImportError:
        raise PeftlabError("--executor ray needs the ray extra: pip install 'peftlab[ray]'") from None
    return ray


def processes_per_run(gpus: float) -> int:
    """Processes a Ray run starts: one per GPU it declares when it declares several (a whole number)."""
    if gpus > 1 and gpus != int(gpus):
        raise PeftlabError(f"--gpus-per-run {gpus:g}: above 1 it is the number of GPUs (and processes) of each run, "
                           "so a whole number; fractions below 1 share a GPU between runs")
    return int(gpus) if gpus > 1 else 1


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}


def make_executor(name: str, jobs: int, threads: int, gpus: float = 0.0, address: str | None = None) -> Executor:
    """The executor `--executor` names, its settings checked before anything is written."""
    if jobs < 1:
        raise PeftlabError(f"--jobs must be >= 1, got {jobs}")
    if name not in EXECUTORS:
        raise PeftlabError(f"--executor {name!r}: valid executors are {' and '.join(EXECUTORS)}")
    processes_per_run(gpus)
    return LocalExecutor(jobs, threads) if name == "local" else RayExecutor(threads, gpus, address)
