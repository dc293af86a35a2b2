"""One study run in its own process: `python -m peftlab.studies.worker STUDY_DIR RUN_ID THREADS`.

The worker records its own outcome in the store, so a run that finishes is never lost even when
the study process was killed while it ran.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

RESULT_KEYS = ("status", "error", "metrics", "cost", "data", "final_train_loss", "method", "prefix_cache", "environment")


def run_dir(study_dir: Path, run_id: str) -> Path:
    return study_dir / "runs" / run_id


def execute_study_run(study_dir: Path, run_id: str, config: dict[str, Any], threads: int) -> tuple[str, dict | None, str | None]:
    """Run one config into STUDY_DIR/runs/RUN_ID; (status, result summary, error). Never raises."""
    import torch

    from peftlab.config import RunConfig
    from peftlab.errors import PeftlabError
    from peftlab.train.run import execute_run

    torch.set_num_threads(threads)
    out = run_dir(study_dir, run_id)
    for stale in (out, out.with_name(out.name + ".partial")):  # left by an attempt that did not finish
        shutil.rmtree(stale, ignore_errors=True)
    try:
        result = execute_run(RunConfig.model_validate(config), out)
    except PeftlabError as exc:
        return "failed", None, str(exc)
    except Exception as exc:  # a crash in one run must not take the study down
        traceback.print_exc()  # into the run's log
        return "failed", None, traceback.format_exception_only(exc)[-1].strip()
    return result["status"], {k: result.get(k) for k in RESULT_KEYS}, result.get("error")


def main(argv: list[str]) -> int:
    from peftlab.cli import quiet_libraries
    from peftlab.studies.store import Store

    quiet_libraries()
    study_dir, run_id, threads = Path(argv[0]), argv[1], int(argv[2])
    store = Store(study_dir / "study.db")
    config = json.loads(store.get(run_id)["config"])
    status, result, error = execute_study_run(study_dir, run_id, config, threads)
    store.finish(run_id, status, result, error)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
