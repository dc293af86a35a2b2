"""Training checkpoints: saving them changes nothing, and a run stopped after one (Ctrl-C, or SIGKILL of the
process) and started again ends with the uninterrupted run's metrics (fp32, CPU, same seed)."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import run_to_dict

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.specs import RunConfig
from peftlab.train import checkpoint


def config_dict(reviews_file, steps=9, every=2, method="lora"):
    return {
        "model": {"name": "tiny-bert", "dropout": 0.1},  # dropout: the random generators must be restored too
        "task": {"path": str(reviews_file), "kind": "classification"},
        "plan": {"placement": "all", "allocation": 4},
        "method": method,
        "train": {"max_steps": steps, "batch_size": 16, "lr": 5e-3, "latency_batches": 0, "log_every": 1,
                  "eval_every": 4, "checkpoint_every": every, "batching": "random"},
    }


@contextmanager
def stopped_after_checkpoint(monkeypatch, step=None):
    """A Ctrl-C right after the checkpoint at `step` (None: the first one) inside the block; the block must be
    stopped by it. Saving works as usual again after the block."""
    save = checkpoint.Checkpoints.save

    def save_then_stop(self, at, *args):
        save(self, at, *args)
        if step is None or at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpoints, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(checkpoint.Checkpoints, "save", save)


def same_learning(a, b):
    assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=1e-6, abs=1e-7)
    for split in ("validation", "test"):
        for name, value in a["metrics"][split].items():
            assert b["metrics"][split][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (split, name)


def test_saving_checkpoints_changes_nothing(tmp_path, reviews_file):
    plain = run_to_dict(validate(RunConfig, config_dict(reviews_file, every=0), "t"), tmp_path / "plain")
    saved = run_to_dict(validate(RunConfig, config_dict(reviews_file, every=2), "t"), tmp_path / "saved")
    same_learning(plain, saved)
    assert saved["speed"]["checkpoint"] == {"every": 2, "resumed_from_step": 0}
    assert not (tmp_path / "saved" / "checkpoint").exists()  # removed once the run is done


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_same_metrics(tmp_path, reviews_file, monkeypatch):
    # 9 steps of 16 over 86 training reviews: the resumed run crosses an epoch boundary after its checkpoint
    config = validate(RunConfig, config_dict(reviews_file), "t")
    whole = run_to_dict(config, tmp_path / "whole")
    with stopped_after_checkpoint(monkeypatch, 6):
        run_to_dict(config, tmp_path / "resumed")
    partial = tmp_path / "resumed.partial"
    assert (partial / "checkpoint" / "latest").read_text() == "step-00000006"
    resumed = run_to_dict(config, tmp_path / "resumed")
    assert resumed["speed"]["checkpoint"]["resumed_from_step"] == 6
    same_learning(whole, resumed)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("split")) for r in rows] == [(r["step"], r.get("split")) for r in expected]
    losses = [[r["train_loss"] for r in table if "train_loss" in r] for table in (rows, expected)]
    assert len(losses[0]) == 9 and losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_a_changed_config_starts_afresh(tmp_path, reviews_file, monkeypatch):
    with stopped_after_checkpoint(monkeypatch):
        run_to_dict(validate(RunConfig, config_dict(reviews_file), "t"), tmp_path / "run")
    other = validate(RunConfig, {**config_dict(reviews_file), "plan": {"placement": "attention", "allocation": 4}}, "t")
    assert run_to_dict(other, tmp_path / "run")["speed"]["checkpoint"]["resumed_from_step"] == 0


@pytest.mark.parametrize("method", ["adalora", "sparselora"])
@pytest.mark.parametrize("field", ["checkpoint_every", "stop_at"])
def test_methods_with_state_outside_a_checkpoint_refuse_it(reviews_file, method, field):
    from peftlab.resolve.run import resolve_run

    config = config_dict(reviews_file, method=method, every=0)
    config["train"][field] = 2 if field == "checkpoint_every" else 0.5
    with pytest.raises(PeftlabError, match=f"train.{field}: method {method} keeps training state"):
        resolve_run(validate(RunConfig, config, "t"))


def test_sigkill_then_the_same_command_resumes(tmp_path, reviews_file):
    """A real kill: the process gets SIGKILL once its checkpoint at step >= 4 exists; the same command resumes."""
    steps = 40
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_dict(reviews_file, steps=steps, every=1)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "peftlab", "run", "-c", str(config), "--output"]
    subprocess.run([*command, str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    process = subprocess.Popen([*command, str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    pointer = tmp_path / "killed.partial" / "checkpoint" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if pointer.is_file() and int(pointer.read_text().removeprefix("step-")) >= 4:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run([*command, str(tmp_path / "killed")], check=True, env=env, capture_output=True)
    whole = json.loads((tmp_path / "whole" / "result.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert 4 <= resumed["speed"]["checkpoint"]["resumed_from_step"] < steps
    same_learning(whole, resumed)


def test_a_study_run_attempted_again_resumes_from_its_checkpoint(tmp_path, reviews_file, monkeypatch):
    """What a study's recovery does after a killed run process: the same run id, attempted again."""
    from peftlab.studies.worker import execute_study_run

    config = validate(RunConfig, config_dict(reviews_file), "t").model_dump(mode="json", by_alias=True)
    with stopped_after_checkpoint(monkeypatch, 4):
        execute_study_run(tmp_path, "abc", config, threads=1)
    status, _, error = execute_study_run(tmp_path, "abc", config, threads=1)
    assert status == "done", error
    result = json.loads((tmp_path / "runs" / "abc" / "result.json").read_text())
    assert result["speed"]["checkpoint"]["resumed_from_step"] == 4


def test_run_flags_set_device_checkpointing_and_trackers(tmp_path, reviews_file, cli):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    code, _, err = cli("run", "--model", "tiny-bert", "--data", reviews_file, "--kind", "classification",
                       "--max-steps", "2", "--device", "cpu", "--gradient-checkpointing", "--checkpoint-every", "1",
                       "--track", "tensorboard", "--output", out)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["train"]["device"] == "cpu" and result["config"]["tracking"]["backends"] == ["tensorboard"]
    assert result["speed"]["gradient_checkpointing"] == {"used": True}
    assert result["speed"]["checkpoint"] == {"every": 1, "resumed_from_step": 0}
    assert (out / "tensorboard").is_dir()


def test_a_resumed_run_continues_its_first_tracker_run(tmp_path, reviews_file, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    config = validate(RunConfig, {**config_dict(reviews_file), "tracking": {"backends": ["mlflow", "tensorboard"],
                                                                           "project": "resume", "mlflow_uri": uri}}, "t")
    with stopped_after_checkpoint(monkeypatch, 6):
        run_to_dict(config, tmp_path / "run")
    first = json.loads((tmp_path / "run.partial" / "trackers.json").read_text())["mlflow"]
    run_to_dict(config, tmp_path / "run")
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("resume").experiment_id])  # one run, not two
    assert run.info.run_id == first == json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    assert run.info.status == "FINISHED" and "final/test/loss" in run.data.metrics
    assert {m.step for m in client.get_metric_history(first, "train/loss")} == set(range(1, 10))


def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DAMAGE = {  # name: (file under the checkpoint folder or the partial run, how it is damaged)
    "truncated trainable.safetensors": ("trainable.safetensors", truncate),
    "state.json is {": ("state.json", lambda p: p.write_text("{")),
    "state.json is {}": ("state.json", lambda p: p.write_text("{}")),
    "state.json step 'abc'": ("state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "abc"}))),
    "state.json step 10^9": ("state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": 10**9}))),
    "empty optimizer.pt": ("optimizer.pt", lambda p: p.write_bytes(b"")),
    "foreign optimizer.pt": ("optimizer.pt", lambda p: __import__("torch").save({"state": {}, "param_groups": [{"params": [0]}]}, p)),
    "truncated scheduler.pt": ("scheduler.pt", truncate),
    "garbage rng.pt": ("rng.pt", lambda p: p.write_bytes(os.urandom(300))),
    "a garbage line in metrics.jsonl": ("../../metrics.jsonl", lambda p: p.write_text("garbage\n" + p.read_text())),
    "a deleted metrics.jsonl": ("../../metrics.jsonl", lambda p: p.unlink()),
    "latest names nothing": ("../latest", lambda p: p.write_text("step-99999999")),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_a_damaged_checkpoint_is_named_in_one_warning_and_the_run_starts_over(tmp_path, reviews_file, monkeypatch, name):
    from peftlab.errors import PeftlabWarning

    config = validate(RunConfig, config_dict(reviews_file, steps=5), "t")
    with stopped_after_checkpoint(monkeypatch, 4):
        run_to_dict(config, tmp_path / "run")
    relative, damage = DAMAGE[name]
    damage(tmp_path / "run.partial" / "checkpoint" / "step-00000004" / relative)
    with pytest.warns(PeftlabWarning, match="the checkpoint cannot be resumed from, so the run starts over") as caught:
        result = run_to_dict(config, tmp_path / "run")
    assert result["speed"]["checkpoint"]["resumed_from_step"] == 0 and result["status"] == "done"
    damaged = [str(w.message) for w in caught if issubclass(w.category, PeftlabWarning)]
    assert len(damaged) == 1 and Path(relative).name in damaged[0], damaged


def test_a_last_metrics_line_cut_short_by_a_kill_is_dropped_and_the_run_resumes(tmp_path, reviews_file, monkeypatch):
    config = validate(RunConfig, config_dict(reviews_file, steps=5), "t")
    with stopped_after_checkpoint(monkeypatch, 4):
        run_to_dict(config, tmp_path / "run")
    with (tmp_path / "run.partial" / "metrics.jsonl").open("a") as history:
        history.write('{"step": 5, "train_lo')
    assert run_to_dict(config, tmp_path / "run")["speed"]["checkpoint"]["resumed_from_step"] == 4


def test_a_run_stopped_at_a_rung_resumes_to_the_uninterrupted_run_s_weights_and_metrics(tmp_path, reviews_file):
    """`train.stop_at`: successive halving's rung. The stopped run keeps only a `.partial` directory and its
    validation scores; the config without the stop resumes on the full run's schedule, bit for bit."""
    from safetensors.torch import load_file

    config = config_dict(reviews_file, every=0)
    whole = run_to_dict(validate(RunConfig, config, "t"), tmp_path / "whole")
    config["train"]["stop_at"] = 0.45  # of 9 steps: 4
    stopped = run_to_dict(validate(RunConfig, config, "t"), tmp_path / "rung")
    assert stopped["status"] == "stopped" and stopped["cost"]["steps"] == 4 and set(stopped["metrics"]) == {"validation"}
    assert not (tmp_path / "rung").exists() and (tmp_path / "rung.partial" / "checkpoint" / "latest").is_file()
    assert stopped["metrics"]["validation"]["loss"] != whole["metrics"]["validation"]["loss"]  # four steps of nine

    del config["train"]["stop_at"]
    resumed = run_to_dict(validate(RunConfig, config, "t"), tmp_path / "rung")
    assert resumed["status"] == "done" and resumed["speed"]["checkpoint"]["resumed_from_step"] == 4
    assert resumed["metrics"]["test"] == whole["metrics"]["test"]  # exactly
    assert resumed["metrics"]["validation"] == whole["metrics"]["validation"]
    adapters = [load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("whole", "rung")]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(adapters[0][k].equal(adapters[1][k]) for k in adapters[0])
    assert not (tmp_path / "rung" / "checkpoint").exists() and not (tmp_path / "rung.partial").exists()


def test_a_study_refuses_stopped_runs(tmp_path):
    from peftlab.specs import StudySpec

    with pytest.raises(PeftlabError, match="train.stop_at: a study stops its runs itself"):
        validate(StudySpec, {"name": "s", "base": {"train": {"stop_at": 0.5}}}, "study.yaml")
