"""Experiment trackers through accelerate's tracking API (`tracking:` in a run config): TensorBoard, MLflow and
Weights & Biases receive the resolved config as parameters, the training curve and the final metrics and costs.

Offline by default: TensorBoard writes into the run directory, MLflow to $MLFLOW_TRACKING_URI or else a local
file store (./mlruns), W&B in offline mode unless $WANDB_MODE says otherwise."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import PeftlabError, warn

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    from peftlab.specs import TrackingSpec

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # backend -> module it needs


MLFLOW_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
REACH_SECONDS = 3.0  # how long a tracking server gets to accept a connection before the run is refused


def check_backends(spec: TrackingSpec) -> None:
    """Every backend's package is installed (else one line naming the extra that installs it), and MLflow's
    store can be used: a known scheme, a writable place for a file or SQLite store, a server that accepts a
    connection within REACH_SECONDS. Checked before anything is read or trained."""
    for backend in spec.backends:
        if importlib.util.find_spec(PACKAGES[backend]) is None:
            raise PeftlabError(f"tracking.backends: {backend} needs its package; install it with "
                               f"pip install 'peftlab[{backend}]'")
    if "mlflow" in spec.backends:
        _check_mlflow_uri(*mlflow_uri(spec))


def mlflow_uri(spec: TrackingSpec) -> tuple[str, str]:
    """(MLflow's tracking URI, where it was given)."""
    if spec.mlflow_uri:
        return spec.mlflow_uri, "tracking.mlflow_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
    return (Path.cwd() / "mlruns").as_uri(), "MLflow's default store ./mlruns"


def _check_mlflow_uri(uri: str, source: str) -> None:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]  # postgresql+psycopg2 and the like
    if not parsed.scheme and uri:  # a bare path: a file store
        scheme, path = "file", uri
    else:
        path = unquote(parsed.path)
    if scheme not in MLFLOW_SCHEMES:
        raise PeftlabError(f"{source}: {uri!r} has no MLflow store scheme; valid: "
                           f"{', '.join(s + ':' for s in MLFLOW_SCHEMES)} (e.g. file:///tmp/mlruns, http://host:5000)")
    if scheme == "file":
        _check_writable(Path(path), uri, source, must_exist=False)
    elif scheme == "sqlite":
        if parsed.path in ("", "/", "/:memory:"):
            return
        _check_writable(Path(path).parent, uri, source, must_exist=True)
    elif scheme in ("http", "https"):
        import socket

        port = parsed.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "", port), timeout=REACH_SECONDS).close()
        except OSError as exc:
            raise PeftlabError(f"{source}: cannot reach the MLflow server at {uri} within {REACH_SECONDS:g} s "
                               f"({exc.strerror or type(exc).__name__}); start it, or track to a file store") from None


def _check_writable(directory: Path, uri: str, source: str, must_exist: bool) -> None:
    """`directory` is a directory this process may write in, or (unless `must_exist`) can be created as one."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != directory and must_exist:
        raise PeftlabError(f"{source}: {uri!r}: {directory} does not exist; create it or choose another path")
    if not existing.is_dir():
        raise PeftlabError(f"{source}: {uri!r}: {existing} is not a directory")
    try:  # a real write (access bits say yes to root, and to read-only file systems such as /proc)
        Path(tempfile.mkdtemp(prefix=".peftlab-check-", dir=existing)).rmdir()
    except OSError:
        raise PeftlabError(f"{source}: {uri!r}: {existing} is not writable; choose a store where this user can "
                           "write") from None


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

            uri, _ = mlflow_uri(spec)
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
    _log(accelerator, values, row["step"])


def _log(accelerator: Accelerator, values: dict[str, Any], step: int) -> None:
    """`accelerator.log`; a tracker that fails (a server gone, a full disk) is named in one warning and
    dropped, so the run goes on and keeps its own result. Its run is still closed where the client can (an
    MLflow run left open would be the parent of the next one the process starts)."""
    for tracker in list(accelerator.trackers):
        try:
            tracker.log(values, step=step)
        except Exception as exc:  # each tracker's client fails its own way
            accelerator.trackers.remove(tracker)
            warn(f"tracking: {tracker.name} failed at step {step} and is dropped for the rest of the run "
                 f"({_first_line(exc)}); the run's own files are complete")
            with contextlib.suppress(Exception):  # best effort: the server may be the thing that failed
                tracker.finish()


def finish_trackers(accelerator: Accelerator) -> None:
    """Close every tracker's run and files; one that fails is named in a warning."""
    for tracker in accelerator.trackers:
        try:
            tracker.finish()
        except Exception as exc:  # as in `_log`
            warn(f"tracking: {tracker.name} failed to finish ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def log_result(accelerator: Accelerator, result: dict[str, Any], step: int) -> None:
    """The final metrics (`final/<split>/<name>`, nested ones by their path: `final/benchmarks/<task>/<metric>`)
    and scalar costs (`cost/<name>`)."""
    values = {**_scalars("final", result["metrics"]), **_scalars("cost", result["cost"]),
              "final/train_loss": result["final_train_loss"]}
    _log(accelerator, {k: v for k, v in values.items() if v == v}, step)  # NaN: not a number to plot


def _scalars(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    """Every number in `values`, at any depth, under its `/`-joined path."""
    found: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            found.update(_scalars(f"{prefix}/{name}", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[f"{prefix}/{name}"] = value
    return found
