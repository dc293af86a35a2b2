"""One study run in its own process.

Local studies start each run as a child of a fork server that has imported torch, transformers, peft
and peftlab once (`PRELOAD`), so a run process begins with its imports done (importing peft alone takes
seconds, paid once per study instead of once per run) and still crashes alone. The worker records its
own outcome in the store, so a run that finishes is never lost even when the study process was killed
while it ran.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

# What the fork server imports before it forks run processes (the heavy part of a run's start). peftlab
# first: its package quiets a library's import-time log before peft imports that library.
PRELOAD = ("peftlab", "torch", "transformers", "peft", "accelerate", "peftlab.api", "peftlab.cli")


def execute_study_run(study_dir: Path, run_id: str, config: dict[str, Any], threads: int) -> tuple[str, dict | None, str | None]:
    """Run one config into STUDY_DIR/runs/RUN_ID; (status, result summary, error). Never raises."""
    import torch

    from peftlab.errors import PeftlabError
    from peftlab.records.store import run_dir
    from peftlab.resolve.run import resolve_run
    from peftlab.specs import RunConfig
    from peftlab.train.run import execute_run

    torch.set_num_threads(threads)
    out = run_dir(study_dir, run_id)
    # left by an attempt that did not finish; its `.partial` directory is resumed where it holds a training
    # checkpoint of this config (train.checkpoint_every), else `execute_run` removes it
    shutil.rmtree(out, ignore_errors=True)
    try:
        result = execute_run(resolve_run(RunConfig.model_validate(config)), out)
    except PeftlabError as exc:
        return "failed", None, str(exc)
    except Exception as exc:  # a crash in one run must not take the study down
        traceback.print_exc()  # into the run's log
        return "failed", None, traceback.format_exception_only(exc)[-1].strip()
    return result.status, result.stored(), result.error


def execute_parallel_study_run(study_dir: Path, run_id: str, config: dict[str, Any], threads: int,
                               processes: int) -> tuple[str, dict | None, str | None]:
    """`execute_study_run` over `processes` processes on this machine (a Ray task that holds several GPUs, one per
    process): `peftlab run` under torchrun, data parallel (`train.distributed`). Never raises."""
    import subprocess
    import tempfile

    from peftlab.records.store import run_dir
    from peftlab.specs import RunConfig
    from peftlab.train.result import RunResult

    out = run_dir(study_dir, run_id)
    shutil.rmtree(out, ignore_errors=True)
    config = {**config, "train": {k: v for k, v in config.get("train", {}).items() if k != "stop_at"}}
    # a run over several processes cannot stop at a rung (no checkpoints yet): it trains to the end, and
    # successive halving reads its final scores at every rung
    with tempfile.TemporaryDirectory(prefix="peftlab-run-") as scratch:
        config_file = Path(scratch) / "config.yaml"
        config_file.write_text(RunConfig.model_validate(config).to_yaml())
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "peftlab", "run", "-c", str(config_file), "--output", str(out)]
        code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes))}).returncode
    result_file = out / "result.json"
    if not result_file.is_file():
        return "failed", None, f"run over {processes} processes exited with code {code} before writing its result"
    result = RunResult.from_dict(json.loads(result_file.read_text()))
    return result.status, result.stored(), result.error


def run_process(study_dir: Path, run_id: str, threads: int, log: Path, env: dict[str, str]) -> None:
    """The body of a run process: the study's environment as it is now (the fork server's dates from its
    start), output into the run's log, the run, its outcome into the store."""
    from peftlab import quiet_libraries
    from peftlab.records.store import Store

    os.environ.clear()
    os.environ.update(env)
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(descriptor, stream.fileno())
    os.close(descriptor)
    quiet_libraries()
    store = Store(study_dir / "study.db")
    config = json.loads(store.get(run_id)["config"])
    status, result, error = execute_study_run(study_dir, run_id, config, threads)
    store.finish(run_id, status, result, error)
