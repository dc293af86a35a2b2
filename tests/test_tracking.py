"""Experiment trackers through accelerate: what a run logs is read back with TensorBoard's and MLflow's own
readers (parameters, a metric history, tags), and a study names and tags each run."""

import json

import pytest
import yaml

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.specs import RunConfig, StudySpec
from peftlab.studies.grid import expand

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def tracked_config(reviews_file, tmp_path, **tracking):
    return validate(RunConfig, {
        "model": "tiny-bert",
        "task": {"path": str(reviews_file), "kind": "classification"},
        "plan": {"placement": "attention", "allocation": 2},
        "train": {"max_steps": 6, "batch_size": 8, "log_every": 2, "latency_batches": 0},
        "tracking": {"backends": ["tensorboard", "mlflow"], "project": "reviews", "tags": {"who": "test"},
                     "mlflow_uri": (tmp_path / "mlruns").as_uri(), **tracking},
    }, "test")


def test_a_run_logs_to_tensorboard_and_mlflow(tmp_path, reviews_file):
    from conftest import run_to_dict
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_to_dict(tracked_config(reviews_file, tmp_path), tmp_path / "run")
    assert result["status"] == "done"

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert events.Scalars("final/test/accuracy")[0].value == pytest.approx(result["metrics"]["test"]["accuracy"])
    assert "cost/train_seconds" in scalars and "validation/loss" in scalars

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("reviews")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.data.tags["who"] == "test"
    assert run.data.params["train.max_steps"] == "6" and run.data.params["model.name"] == "tiny-bert"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6]
    assert run.data.metrics["final/test/loss"] == pytest.approx(result["metrics"]["test"]["loss"])


def test_a_missing_backend_names_its_extra(tmp_path, reviews_file, monkeypatch):
    import importlib.util

    from peftlab.resolve.run import resolve_run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = tracked_config(reviews_file, tmp_path, backends=["wandb"])
    with pytest.raises(PeftlabError, match=r"tracking.backends: wandb needs its package; .*peftlab\[wandb\]"):
        resolve_run(config)


def test_tracking_shorthand_and_validation():
    assert validate(RunConfig, {"tracking": "mlflow"}, "c").tracking.backends == ["mlflow"]
    assert validate(RunConfig, {"tracking": ["tensorboard", "mlflow"]}, "c").tracking.backends == ["tensorboard", "mlflow"]
    with pytest.raises(PeftlabError, match="tracking.backends"):
        validate(RunConfig, {"tracking": ["neptune"]}, "c")


def test_a_study_names_and_tags_each_run_and_trackers_change_no_run_id(tmp_path, reviews_file):
    base = yaml.safe_load(tracked_config(reviews_file, tmp_path).to_yaml())
    spec = validate(StudySpec, {"name": "ranks", "base": base, "axes": {"rank": [2, 4]}, "seeds": [0, 1]}, "s")
    runs = expand(spec)
    named = {(r.label, r.seed): r.config["tracking"] for r in runs}
    assert named[("rank=4", 1)]["run_name"] == "ranks/rank=4/seed 1"
    assert named[("rank=4", 1)]["tags"] == {"who": "test", "study": "ranks", "configuration": "rank=4", "seed": "1",
                                            "phase": "main"}
    untracked = expand(spec.model_copy(update={"base": {k: v for k, v in base.items() if k != "tracking"}}))
    assert [(r.id, r.group) for r in runs] == [(r.id, r.group) for r in untracked]
    assert len({r.group for r in runs}) == 2  # seeds of a configuration stay one group
    assert json.dumps(runs[0].config)  # stored as JSON in the study database


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning_and_the_run_keeps_its_result(
        tmp_path, reviews_file, monkeypatch):
    from accelerate.tracking import MLflowTracker
    from conftest import run_to_dict

    from peftlab.errors import PeftlabWarning

    calls = []

    def fails_on_the_second_log(self, values, step=None, **kwargs):
        calls.append(step)
        if len(calls) > 1:
            raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(MLflowTracker, "log", fails_on_the_second_log)
    with pytest.warns(PeftlabWarning) as caught:
        result = run_to_dict(tracked_config(reviews_file, tmp_path), tmp_path / "run")
    assert result["status"] == "done" and (tmp_path / "run" / "result.json").is_file()
    messages = [str(w.message) for w in caught if "tracking:" in str(w.message)]
    assert messages == ["tracking: mlflow failed at step 4 and is dropped for the rest of the run (the tracking "
                        "server went away); the run's own files are complete"]
    assert calls == [2, 4]  # never asked again


def test_nested_final_metrics_are_logged_by_their_path():
    """A benchmark's scores (`metrics.benchmarks.<task>.<metric>`) reach the trackers as final/benchmarks/..."""
    from types import SimpleNamespace

    from peftlab.train.tracking import log_result

    logged = []
    tracker = SimpleNamespace(name="stub", log=lambda values, step: logged.append((values, step)))
    result = {"metrics": {"test": {"loss": 1.5, "degenerate": False, "note": "text"},
                          "benchmarks": {"arc_easy": {"acc": 0.25, "acc_stderr": float("nan")}}},
              "cost": {"train_seconds": 3.0, "peak": {"device": 7}}, "final_train_loss": 2.0}
    log_result(SimpleNamespace(trackers=[tracker]), result, step=9)
    assert logged == [({"final/test/loss": 1.5, "final/benchmarks/arc_easy/acc": 0.25, "cost/train_seconds": 3.0,
                        "cost/peak/device": 7, "final/train_loss": 2.0}, 9)]
