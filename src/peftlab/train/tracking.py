"""Experiment trackers through accelerate's tracking API (`tracking:` in a run config): TensorBoard, MLflow and
Weights & Biases receive the resolved config as parameters, the training curve and the final metrics and costs.

Offline by default: TensorBoard writes into the run directory, MLflow to $MLFLOW_TRACKING_URI or else a local
file store (./mlruns), W&B in offline mode unless $WANDB_MODE says otherwise."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import PeftlabError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    from peftlab.specs import TrackingSpec

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # backend -> module it needs


def check_backends(spec: TrackingSpec) -> None:
    """Every backend's package is installed; else one line naming the extra that installs it."""
    for backend in spec.backends:
        if importlib.util.find_spec(PACKAGES[backend]) is None:
            raise PeftlabError(f"tracking.backends: {backend} needs its package; install it with "
                               f"pip install 'peftlab[{backend}]'")


def trackers(spec: TrackingSpec, run_dir: Path, run_name: str, resumed: dict[str, str] | None = None
             ) -> list[GeneralTracker]:
    """accelerate trackers for `spec`, writing (TensorBoard, W&B) into `run_dir`. `resumed`: the tracker run ids
    of the run's first start (`tracker_run_ids`), which a run resumed from a training checkpoint continues
    (TensorBoard continues by writing into the same directory)."""
    resumed = resumed or {}
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    name = spec.run_name or run_name
    out: list[GeneralTracker] = []
    for backend in spec.backends:
        if backend == "tensorboard":
            out.append(TensorBoardTracker("tensorboard", run_dir))
        elif backend == "mlflow":
            import mlflow

            uri = spec.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").as_uri()
            if uri.startswith("file:"):  # MLflow 3 keeps file stores only on request; offline needs no server
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
            out.append(MLflowTracker(spec.project, tags=dict(spec.tags), run_name=name, run_id=resumed.get("mlflow")))
        else:
            os.environ.setdefault("WANDB_MODE", "offline")
            resume = {"id": resumed["wandb"], "resume": "allow"} if "wandb" in resumed else {}
            out.append(WandBTracker(spec.project, name=name, tags=[f"{k}={v}" for k, v in spec.tags.items()],
                                    dir=str(run_dir), config={}, **resume))
    return out


def tracker_run_ids(started: list[GeneralTracker]) -> dict[str, str]:
    """backend -> its run id, for the trackers that have one (MLflow, W&B)."""
    ids = {}
    for tracker in started:
        if tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
        elif tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
    return ids


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys with scalar values (lists as text), as trackers take parameters."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        elif value is not None:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def log_row(accelerator: Accelerator, row: dict[str, Any]) -> None:
    """One row of metrics.jsonl: a training row (train_loss, lr, ...) or an evaluation (`split`)."""
    split = row.get("split")
    values = {(f"{split}/{k}" if split else f"train/{k.removeprefix('train_')}"): v for k, v in row.items()
              if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    accelerator.log(values, step=row["step"])


def log_result(accelerator: Accelerator, result: dict[str, Any], step: int) -> None:
    """The final metrics (`final/<split>/<name>`) and scalar costs (`cost/<name>`)."""
    values = {f"final/{split}/{name}": value for split, metrics in result["metrics"].items()
              for name, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    values.update({f"cost/{name}": value for name, value in result["cost"].items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)})
    values["final/train_loss"] = result["final_train_loss"]
    accelerator.log({k: v for k, v in values.items() if v == v}, step=step)  # NaN: not a number to plot
