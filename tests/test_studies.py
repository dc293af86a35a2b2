"""Studies: expansion, the resumable store, local and Ray execution, kills, failures, export."""

import json
import math
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.records.results import export, run_rows
from peftlab.records.store import open_existing
from peftlab.specs import StudySpec
from peftlab.studies.grid import expand
from peftlab.studies.runner import run_study

pytestmark = pytest.mark.usefixtures("private_cache")  # a cache of its own per test


@pytest.fixture
def data_file(tmp_path):
    words = {"pos": ["tasty", "great", "lovely", "fresh"], "neg": ["stale", "awful", "bland", "soggy"]}
    rows = [{"text": f"the food was {words[l][i % 4]}", "label": l} for i in range(60) for l in ("pos", "neg")]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_spec(data_file, **changes):
    spec = {
        "name": "tiny",
        "base": {
            "model": "tiny-bert",
            "task": {"path": str(data_file), "kind": "classification", "max_eval_examples": 16},
            "plan": {"allocation": 2},
            "train": {"max_steps": 3, "batch_size": 8, "latency_batches": 0},
        },
        "axes": {"placement": {"all": "all", "attention": "attention"}},
        "seeds": [0, 1],
    }
    spec.update(changes)
    return validate(StudySpec, spec, "test")


def test_expansion_ids_are_config_hashes(data_file):
    runs = expand(tiny_spec(data_file, axes={"rank": [4, "uniform(4)", 2]}))
    assert len(runs) == 4  # rank 4 written two ways is one configuration
    assert {r.label for r in runs} == {"rank=4", "rank=2"}
    again = expand(tiny_spec(data_file, axes={"rank": [2, 4]}))
    assert {r.id for r in runs} == {r.id for r in again}
    groups = {r.group for r in runs}
    assert len(groups) == 2 and all(r.error is None for r in runs)


def test_invalid_axis_value_is_a_failed_run(data_file):
    runs = expand(tiny_spec(data_file, axes={"rank": [2, 0]}))
    bad = [r for r in runs if r.error]
    assert len(bad) == 2 and "plan.allocation.rank" in bad[0].error


def test_bad_axis_name_is_rejected():
    with pytest.raises(PeftlabError, match="unknown axis 'colour'"):
        validate(StudySpec, {"name": "x", "axes": {"colour": ["red"]}}, "spec.yaml")


def test_local_study_resumes_and_grows(tmp_path, data_file):
    study_dir = tmp_path / "study"
    store = run_study(tiny_spec(data_file), study_dir, jobs=2, threads=1)
    rows = run_rows(store)
    assert [r["status"] for r in rows] == ["done"] * 4
    assert all(r["attempts"] == 1 for r in rows)
    assert all((study_dir / "runs" / r["id"] / "result.json").is_file() for r in rows)
    # resuming runs nothing again; an edited spec adds its new runs and keeps the old ones
    store = run_study(tiny_spec(data_file, seeds=[0, 1, 2]), study_dir, jobs=2, threads=1)
    rows = run_rows(store)
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    assert sorted(r["attempts"] for r in rows) == [1] * 6
    groups = {}
    for r in rows:
        groups.setdefault((r["group"], r["label"]), []).append(r["seed"])
    assert {label: sorted(seeds) for (_, label), seeds in groups.items()} == {
        "placement=all": [0, 1, 2], "placement=attention": [0, 1, 2]}
    assert all(isinstance(r["metrics.test.accuracy"], float) for r in rows)


def test_failures_are_recorded_and_the_study_goes_on(tmp_path, data_file):
    spec = tiny_spec(data_file, axes={"train.lr": {"ok": 1e-3, "explodes": 1e30}}, seeds=[0])
    study_dir = tmp_path / "study"
    rows = {r["axis.train.lr"]: r for r in run_rows(run_study(spec, study_dir, threads=1))}
    assert rows["ok"]["status"] == "done"
    assert rows["explodes"]["status"] == "failed" and "non-finite loss" in rows["explodes"]["error"]
    # --retry-failed runs the failed ones again (they fail again, deterministically)
    again = {r["id"]: r for r in run_rows(run_study(spec, study_dir, retry_failed=True, threads=1))}
    assert again[rows["explodes"]["id"]]["attempts"] == 2 and again[rows["ok"]["id"]]["attempts"] == 1


def test_invalid_configurations_stop_the_study_before_anything_is_written(tmp_path, data_file):
    spec = tiny_spec(data_file, axes={"rank": [2, 0, 99], "train.lr": [1e-3]}, seeds=[0])
    study_dir = tmp_path / "study"
    with pytest.raises(PeftlabError) as err:
        run_study(spec, study_dir, threads=1)
    message = str(err.value)
    assert "2 of 3 configurations are invalid, so nothing was run" in message
    assert "[rank=0, train.lr=0.001]: plan.allocation.rank: Input should be greater than or equal to 1" in message
    assert "rank 99 at" in message  # found on the model's skeleton, not only by the spec's validation
    assert not study_dir.exists()


def test_run_processes_get_the_environment_of_their_study(tmp_path, data_file, monkeypatch):
    """Run processes fork from a server started by the first study; each study's own environment wins."""
    spec = tiny_spec(data_file, seeds=[0], axes={"placement": ["attention"]})
    for name in ("one", "two"):
        monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / f"cache-{name}"))
        rows = run_rows(run_study(spec, tmp_path / name, threads=1))
        assert [r["status"] for r in rows] == ["done"]
        assert list((tmp_path / f"cache-{name}" / "tokenized").glob("*.json"))  # the run's cache went there
        assert (tmp_path / name / "logs" / f"{rows[0]['id']}.log").is_file()


def test_sigkill_at_random_moments_loses_nothing(tmp_path, data_file):
    spec_file = tmp_path / "spec.yaml"
    spec = tiny_spec(data_file, seeds=[0, 1, 2])
    spec_file.write_text(spec.to_yaml())
    study_dir = tmp_path / "study"
    command = [sys.executable, "-m", "peftlab", "study", "run", str(spec_file), "--dir", str(study_dir),
               "--jobs", "2", "--threads", "1"]
    rng = random.Random(7)
    for _ in range(4):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(2.0, 9.0))
        os.killpg(process.pid, signal.SIGKILL)  # the study and its run processes
        process.wait()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    expected = {r.id for r in expand(spec)}
    db = sqlite3.connect(study_dir / "study.db")
    rows = db.execute("SELECT id, status FROM runs").fetchall()
    assert sorted(r[0] for r in rows) == sorted(expected)  # none lost, none duplicated
    assert {r[1] for r in rows} == {"done"}
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert sorted(p.name for p in (study_dir / "runs").iterdir()) == sorted(expected)  # no .partial left


def test_ray_matches_local_successive_halving_included(tmp_path, alpaca_file):
    """The same study (tuning by successive halving, then a seed run) on the local and the Ray executor: the same
    runs, stopped at the same rung, with the same metrics (few runs: Ray's start is the cost)."""
    pytest.importorskip("ray")
    spec = halving_spec(alpaca_file, rates=(1e-5, 1e-2))  # a rung keeps one of two
    local = {r["id"]: r for r in run_rows(run_study(spec, tmp_path / "local", threads=1))}
    ray_rows = {r["id"]: r for r in run_rows(run_study(spec, tmp_path / "ray", executor="ray", threads=1))}
    assert set(local) == set(ray_rows)
    assert sorted(r["status"] for r in local.values()) == ["done", "done", "stopped"]
    for run_id, row in local.items():
        assert ray_rows[run_id]["status"] == row["status"]
        metrics = {k: v for k, v in row.items() if k.startswith("metrics.")}
        assert metrics and metrics == {k: ray_rows[run_id][k] for k in metrics}


def test_export_csv_and_parquet(tmp_path, data_file):
    import pandas as pd

    store = run_study(tiny_spec(data_file, seeds=[0]), tmp_path / "study", threads=1)
    csv = pd.read_csv(export(store, tmp_path / "runs.csv"))
    parquet = pd.read_parquet(export(store, tmp_path / "runs.parquet"))
    for frame in (csv, parquet):
        assert len(frame) == 2
        assert {"id", "label", "seed", "status", "axis.placement", "metrics.test.accuracy", "cost.trainable_params"} <= set(frame.columns)
    assert sorted(parquet["axis.placement"]) == ["all", "attention"]


def test_cli_status_and_errors(tmp_path, data_file, cli):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(tiny_spec(data_file, seeds=[0], axes={"placement": ["attention"]}).to_yaml())
    code, out, _ = cli("study", "run", spec_file, "--dir", tmp_path / "s", "--threads", "1")
    assert code == 0 and "placement=attention" in out and "done: 1" in out
    code, out, _ = cli("study", "status", tmp_path / "s")
    assert code == 0 and "done" in out
    code, _, err = cli("study", "status", tmp_path)
    assert code == 2 and "not a study directory" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b", "seeds": [1, 1]}))
    code, _, err = cli("study", "run", bad)
    assert code == 2 and "seeds repeat" in err
    code, _, err = cli("study", "run", "no-such-study")
    assert code == 2 and "shipped studies are" in err


def test_variant_axis_sets_several_fields_together(data_file):
    spec = tiny_spec(data_file, axes={"variant": {"lora": {"method": "lora", "lr": 1e-3},
                                                  "full": {"method": "full", "train.lr": 5e-5}}}, seeds=[0])
    configs = {r.label: r.config for r in expand(spec)}
    assert configs["variant=full"]["method"]["name"] == "full" and configs["variant=full"]["train"]["lr"] == 5e-5
    assert configs["variant=lora"]["train"]["lr"] == 1e-3
    with pytest.raises(PeftlabError, match="unknown axis 'trian.lr'"):
        tiny_spec(data_file, axes={"variant": {"x": {"trian.lr": 1}}})


def test_dry_run_shows_each_configurations_plan_and_writes_nothing(data_file, tmp_path, cli):
    spec = tiny_spec(data_file, axes={"layers": {"upper": "upper-half", "bad": "7-9"}})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml().replace("allocation: 2", "allocation: attention-heavy(2)"))
    base = yaml.safe_load(spec_file.read_text())["base"]
    base["plan"]["placement"] = ["q", "v"]  # a shorthand the layers axis must keep
    spec_file.write_text(yaml.safe_dump({**yaml.safe_load(spec_file.read_text()), "base": base}))
    study_dir = tmp_path / "study"
    code, out, err = cli("study", "run", spec_file, "--dir", study_dir, "--dry-run")
    assert code == 0, err
    upper = next(line for line in out.splitlines() if "layers=upper" in line)
    # tiny-bert, layer 1 only, q and v (64 -> 64) at attention-heavy(2) = rank 4: 2 x 4 x (64 + 64)
    assert "2 sites: attn.q, attn.v in layers 1, rank 4" in upper and "1,024 trainable" in upper
    bad = next(line for line in out.splitlines() if "layers=bad" in line)
    assert "invalid" in bad
    assert "2 configurations x 2 seeds, 1 invalid; nothing was written" in out
    assert not study_dir.exists()


def tuned_spec(data_file, seeds=(0, 1)):
    return tiny_spec(data_file, tune={"lr": [1e-3, 1e-2], "seeds": [7]}, seeds=list(seeds))


def finish(store, run_id, validation, test):
    store.mark_running(run_id, None)
    store.finish(run_id, "done", {"status": "done", "metrics": {"validation": {"accuracy": validation},
                                                                 "test": {"accuracy": test}},
                                  "data": {"kind": "classification"}}, None)


def test_the_learning_rate_is_chosen_on_validation_only(data_file, tmp_path):
    from peftlab.analysis.analyze import analyze
    from peftlab.records.results import Snapshot
    from peftlab.records.tuning import chosen_points, rate_choices
    from peftlab.studies.runner import add_runs, open_study

    spec = tuned_spec(data_file)
    store, added = open_study(spec, tmp_path / "study")
    rows = store.rows()
    assert added == 4 and {r["phase"] for r in rows} == {"tune"}  # 2 configurations x 2 rates x 1 tuning seed
    assert {json.loads(r["config"])["train"]["seed"] for r in rows} == {7}
    assert all(not json.loads(r["config"])["train"]["evaluate_test"] for r in rows)  # the test split is not read
    assert chosen_points(Snapshot.of(store)) == {}  # nothing finished: no seed run yet
    for row in rows:  # validation prefers 1e-3, test would prefer 1e-2
        low = json.loads(row["config"])["train"]["lr"] == 1e-3
        finish(store, row["id"], validation=0.9 if low else 0.7, test=0.6 if low else 0.95)
    assert chosen_points(Snapshot.of(store)) == {"placement=all": (1e-3,), "placement=attention": (1e-3,)}
    choice = rate_choices(Snapshot.of(store))["placement=all"]
    assert choice.scores == {(1e-3,): 0.9, (1e-2,): 0.7} and choice.at_edge and not choice.undecided
    assert add_runs(spec, store, tmp_path / "study") == 4  # the seed runs, at the chosen rate
    main = [r for r in store.rows() if r["phase"] == "main"]
    assert {json.loads(r["config"])["train"]["lr"] for r in main} == {1e-3}
    assert all(json.loads(r["config"])["train"]["evaluate_test"] for r in main)
    assert sorted(r["seed"] for r in main) == [0, 0, 1, 1]
    assert add_runs(spec, store, tmp_path / "study") == 0  # resumable: the same choice, the same runs
    for row in main:
        finish(store, row["id"], validation=0.8, test=0.8 + 0.01 * row["seed"])
    analysis = analyze(tmp_path / "study")
    assert all(c.summary.n == 2 for c in analysis.configurations)  # tuning runs are not results
    assert any("chosen on the validation split" in line and "edge of the grid" in line for line in analysis.limits)


def test_tuning_beyond_the_rate_chooses_a_point_of_the_grid_on_validation(data_file, tmp_path):
    """tune.grid: every rate with every value of each setting (a point); the best point on validation trains the
    seed runs, and the report names each point."""
    from peftlab.analysis.analyze import analyze
    from peftlab.analysis.report import tuning_table
    from peftlab.records.results import Snapshot
    from peftlab.records.tuning import chosen_points
    from peftlab.studies.runner import add_runs, open_study

    spec = tiny_spec(data_file, seeds=[0], tune={"lr": [1e-3, 1e-2], "seeds": [7],
                                                 "grid": {"train.warmup_ratio": [0.0, 0.1], "train.schedule": ["linear"]}})
    store, added = open_study(spec, tmp_path / "study")
    assert added == 8  # 2 configurations x 2 rates x 2 warmups x 1 schedule x 1 tuning seed
    points = {}
    for row in store.rows():
        config = json.loads(row["config"])
        points[row["id"]] = (config["train"]["lr"], config["train"]["warmup_ratio"], config["train"]["schedule"])
        assert json.loads(row["axes"])["train.warmup_ratio"] == str(points[row["id"]][1])
    assert set(points.values()) == {(lr, w, "linear") for lr in (1e-3, 1e-2) for w in (0.0, 0.1)}
    for row in store.rows():  # validation prefers the small rate with warmup
        finish(store, row["id"], validation=0.9 if points[row["id"]][:2] == (1e-3, 0.1) else 0.7, test=0.5)
    # a point is (rate, then the grid's values by path name): train.schedule before train.warmup_ratio
    assert chosen_points(Snapshot.of(store), spec.tune) == {label: (1e-3, "linear", 0.1)
                                                           for label in ("placement=all", "placement=attention")}
    assert add_runs(spec, store, tmp_path / "study") == 2
    main = [json.loads(r["config"])["train"] for r in store.rows() if r["phase"] == "main"]
    assert {(t["lr"], t["warmup_ratio"], t["schedule"]) for t in main} == {(1e-3, 0.1, "linear")}
    for row in store.rows():
        if row["phase"] == "main":
            finish(store, row["id"], validation=0.8, test=0.8)
    analysis = analyze(tmp_path / "study")
    header, rows = tuning_table(analysis)
    assert header[1] == "point 1" and rows[0][-1] == "lr 0.001, train.schedule linear, train.warmup_ratio 0.1 (edge of the grid)"
    assert "lr 0.001, train.schedule linear, train.warmup_ratio 0.1: 0.9000 *" in rows[0]
    assert analysis.tuning["placement=all"].at_edge  # 1e-3 and 0.1: each at an end of what was tried


def test_tuning_points_can_be_drawn_by_optuna_the_same_each_time(data_file, tmp_path, cli):
    """tune.sample: points drawn up front by a seeded Optuna sampler (Sobol), the same from the same spec; they run
    and are chosen from like a grid's."""
    from peftlab.records.results import Snapshot
    from peftlab.records.tuning import chosen_points
    from peftlab.specs import _sampled
    from peftlab.studies.runner import add_runs, open_study

    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model.dropout": [0.0, 0.1]}
    spec = tiny_spec(data_file, seeds=[0], tune={"seeds": [7], "sample": {"points": 4, "seed": 3, "space": space}})
    points = spec.tune.points(math.nan)
    _sampled.cache_clear()
    assert spec.tune.points(math.nan) == points and len(points) == 4  # drawn again: the same
    assert all(1e-4 <= lr <= 1e-2 and float(f"{lr:.3g}") == lr and dropout in (0.0, 0.1) for lr, dropout in points)
    other = tiny_spec(data_file, tune={"sample": {"points": 4, "seed": 4, "space": space}}).tune.points(math.nan)
    assert other != points
    store, added = open_study(spec, tmp_path / "study")
    assert added == 2 * 4  # 2 configurations x 4 points x 1 tuning seed
    tried = {r["id"]: (json.loads(r["config"])["train"]["lr"], json.loads(r["config"])["model"]["dropout"])
             for r in store.rows()}
    assert set(tried.values()) == set(points)
    best = max(points)
    for run_id, point in tried.items():
        finish(store, run_id, validation=0.9 if point == best else 0.7, test=0.5)
    assert set(chosen_points(Snapshot.of(store), spec.tune).values()) == {best}
    add_runs(spec, store, tmp_path / "study")
    main = [json.loads(r["config"]) for r in store.rows() if r["phase"] == "main"]
    assert len(main) == 2 and all((c["train"]["lr"], c["model"]["dropout"]) == best for c in main)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    code, out, _ = cli("study", "run", spec_file, "--dir", tmp_path / "dry", "--dry-run")
    assert code == 0 and "4 points (sobol, seed 3) over lr, model.dropout" in out and "after 8 tuning runs" in out
    with pytest.raises(PeftlabError, match="sample.space: task.max_length changes what is compared"):
        tiny_spec(data_file, tune={"sample": {"space": {"lr": [1e-3, 2e-3], "task.max_length": [16, 32]}}})
    with pytest.raises(PeftlabError, match="tune.sample draws the rate and the other settings"):
        tiny_spec(data_file, tune={"lr": [1e-3], "sample": {"space": {"lr": [1e-3, 2e-3]}}})


@pytest.mark.parametrize("grid,message", [
    ({"plan.placement.layers": ["all"]}, "changes what is compared or measured"),
    ({"task.max_length": [16, 32]}, "changes what is compared or measured"),
    ({"model.dropout": [0, "high"]}, "values of one kind"),
    ({"plan.alpha": [8, 16]}, "is what the study compares (its axis plan.alpha)"),
    ({"plan.allocation.min": [1, 2]}, "is what the study compares (its axis plan.allocation)"),
])
def test_a_grid_that_would_change_the_comparison_is_refused(data_file, grid, message):
    with pytest.raises(PeftlabError, match=re.escape(message)):
        tiny_spec(data_file, axes={"alpha": [8, 16], "rank": [2, 4]}, tune={"lr": [1e-3], "grid": grid})


def test_a_grid_path_must_name_one_setting(data_file):
    from peftlab.studies.preview import check_configurations

    spec = tiny_spec(data_file, tune={"lr": [1e-3], "grid": {"plan.alpha": [8, 16]}})
    with pytest.raises(PeftlabError, match=r"tune.grid: plan.alpha: a run's config holds \{'policy'"):
        check_configurations(spec)
    check_configurations(tiny_spec(data_file, tune={"lr": [1e-3], "grid": {"plan.alpha.value": [8, 16]}}))


def test_a_tie_over_the_whole_grid_is_named_not_taken_for_a_choice(data_file, tmp_path):
    from peftlab.records.results import Snapshot
    from peftlab.records.tuning import rate_choices
    from peftlab.studies.runner import open_study

    store, _ = open_study(tuned_spec(data_file), tmp_path / "study")
    for row in store.rows():  # every rate collapsed to the majority class
        finish(store, row["id"], validation=0.62, test=0.62)
    choice = rate_choices(Snapshot.of(store))["placement=all"]
    assert choice.undecided and choice.rate == 1e-3


def test_a_configuration_whose_every_rate_failed_records_why(data_file, tmp_path):
    from peftlab.studies.runner import add_runs, open_study

    spec = tuned_spec(data_file)
    store, _ = open_study(spec, tmp_path / "study")
    for row in store.rows():
        store.mark_running(row["id"], None)
        store.finish(row["id"], "failed", None, "non-finite loss")
    add_runs(spec, store, tmp_path / "study")
    main = [r for r in store.rows() if r["phase"] == "main"]
    assert len(main) == 4 and all(r["status"] == "failed" for r in main)
    assert "every learning rate of the grid failed (0.001, 0.01)" in main[0]["error"]


def test_a_configuration_that_collapsed_at_every_rate_gets_no_seed_runs_and_the_report_says_so(data_file, tmp_path):
    """ffn predicts one class at every rate: no seed runs, and the report has its row without a verdict. The
    baseline collapsed too but keeps its seed runs (every comparison needs it); attention, whose 1e-3 run is only
    within noise of the majority class on validation (a statistical finding, not a collapse), keeps them too."""
    from peftlab.analysis.analyze import analyze
    from peftlab.analysis.report import main_table, verdict_note, write_report
    from peftlab.studies.runner import add_runs, open_study

    spec = tiny_spec(data_file, tune={"lr": [1e-3, 1e-2], "seeds": [7]},
                     axes={"placement": {"all": "all", "attention": "attention", "ffn": "ffn"}})
    study = tmp_path / "study"
    store, _ = open_study(spec, study)
    for row in store.rows():
        within_noise = row["label"] == "placement=attention" and json.loads(row["config"])["train"]["lr"] == 1e-3
        validation = {"accuracy": 0.62 if within_noise else 0.6, "predicted_classes": 2 if within_noise else 1,
                      "majority_rate": 0.6, "count": 16}
        store.mark_running(row["id"], None)
        store.finish(row["id"], "done", {"status": "done", "metrics": {"validation": validation},
                                         "cost": {"trainable_params": 96, "base_params": 9600},
                                         "data": {"kind": "classification"}}, None)
    add_runs(spec, store, study)
    main = [r for r in store.rows() if r["phase"] == "main"]
    assert sorted({r["label"] for r in main}) == ["placement=all", "placement=attention"] and len(main) == 4
    for row in main:
        finish(store, row["id"], validation=0.7, test=0.7 + 0.01 * row["seed"])
    analysis = analyze(study)
    assert [n.label for n in analysis.not_run] == ["placement=ffn"]
    reason = analysis.not_run[0].verdict.reason
    assert reason.startswith("did not train at any rate tried (0.001, 0.01; every tuning run predicts a single class "
                             "on validation), so no seed runs")
    row = main_table(analysis)[-1]
    assert row["configuration"] == "placement=ffn" and row["quality (mean, 95% CI)"] == "not run (no seed runs)"
    assert row["verdict"] == f"no verdict: {reason}" and row["trainable params (% of base)"] == "96 (1.000%)"
    assert "No seed runs, so no verdict, for placement=ffn" in verdict_note(analysis)
    assert "1 comparisons resolved" not in verdict_note(analysis) and "of 2 comparisons" in verdict_note(analysis)
    assert any(line.startswith("No seed runs for placement=ffn") for line in analysis.limits)
    _, written = write_report(study)
    markdown = written["markdown"].read_text()
    assert "| placement=ffn | not run (no seed runs) | - | no verdict: did not train at any rate" in markdown
    assert f"- placement=ffn: no seed runs; it {reason}" in markdown and "placement=ffn" in written["latex"].read_text()
    with pytest.raises(PeftlabError, match="placement=ffn has none: every tuning run predicts a single class"):
        analyze(study, baseline="ffn")


def test_seed_runs_start_once_their_configuration_is_tuned_and_rounds_wait_for_every_run(data_file, tmp_path):
    """The scheduler gives new runs after every finished one: a configuration's seed runs as soon as its own
    tuning is done (other configurations may still tune); a round of seeds until resolved only once every
    run of the round is done. An executor that records made-up results runs the study without processes."""
    from peftlab.studies import runner

    spec = tiny_spec(data_file, tune={"lr": [1e-3, 1e-2], "seeds": [7]}, seeds={"min": 2, "max": 3, "futility": 0})
    known: list[tuple[tuple[str, str], list[tuple[str, str, int]]]] = []

    class OneAtATime:
        def run(self, store, study_dir, ids, next_runs):
            queue = list(ids)
            while queue:
                row = store.get(queue.pop(0))
                accuracy = 0.8 + (0.05 * (-1) ** row["seed"] if row["label"] == "placement=attention" else 0.0)
                finish(store, row["id"], validation=0.7, test=accuracy + 0.01 * row["seed"])
                new = next_runs(row["id"])
                known.append(((row["label"], row["phase"]), [(store.get(i)["label"], store.get(i)["phase"],
                                                              store.get(i)["seed"]) for i in new]))
                queue.extend(new)

    store = runner.run_study(spec, tmp_path / "s", executor=OneAtATime())
    # the queue starts with every tuning run, `all`'s before `attention`'s (by label): all's seed runs become
    # known after its second tuning run, before any of attention's tuning runs has finished
    assert known[1] == (("placement=all", "tune"), [("placement=all", "main", 0), ("placement=all", "main", 1)])
    assert known[0][1] == [] and known[2] == (("placement=attention", "tune"), [])
    # the third seeds (the unresolved attention comparison, and the baseline) only after the last seed run of round one
    third = [(i, added) for i, (_, added) in enumerate(known) if any(seed == 2 for *_, seed in added)]
    assert len(third) == 1 and sorted(third[0][1]) == [("placement=all", "main", 2), ("placement=attention", "main", 2)]
    assert third[0][0] == 7 and [phase for (_, phase), _ in known[4:8]] == ["main"] * 4  # after the last of round one
    assert store.counts() == {"done": 4 + 6}


def test_a_tuned_study_runs_tuning_then_seeds_and_reports_the_rates(data_file, tmp_path, cli):
    from peftlab.records.results import Snapshot
    from peftlab.records.tuning import not_run, rate_choices

    spec = tuned_spec(data_file, seeds=[0])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    code, out, _ = cli("study", "run", spec_file, "--dir", tmp_path / "s", "--dry-run")
    assert code == 0 and "lr 0.001, 0.01 x seeds 7" in out and "after 4 tuning runs" in out
    store = run_study(spec, tmp_path / "s", jobs=2, threads=1)
    rows = run_rows(store)
    # a configuration whose tuning runs all collapsed gets no seed run (never the baseline, `all`)
    skipped = set(not_run(Snapshot.of(store), rate_choices(Snapshot.of(store), spec.tune)))
    main = {r["label"] for r in rows if r["phase"] == "main"}
    assert main == {"placement=all", "placement=attention"} - skipped and "placement=all" not in skipped
    assert store.counts() == {"done": 4 + len(main)} and len([r for r in rows if r["phase"] == "tune"]) == 4
    assert all((r.get("metrics.test.accuracy") is None) == (r["phase"] == "tune") for r in rows)
    assert all(r.get("metrics.validation.accuracy") is not None for r in rows)
    code, out, _ = cli("report", tmp_path / "s")
    assert code == 0
    markdown = (tmp_path / "s" / "report.md").read_text()
    assert "## Learning rates" in markdown and "| placement=all | 0.001: " in markdown


def seeds_after_looks(spec, store, study_dir, accuracy, looks):
    """Finish every pending run with test accuracy `accuracy[label](seed)` and let the study add its next seeds,
    `looks` times; then label -> the seeds it has."""
    from peftlab.studies.runner import add_runs

    for _ in range(looks):
        for row in store.rows():
            if row["status"] == "pending":
                finish(store, row["id"], validation=0.0, test=accuracy[row["label"]](row["seed"]))
        add_runs(spec, store, study_dir)
    seeds = {}
    for row in store.rows():
        seeds.setdefault(row["label"], []).append(row["seed"])
    return seeds


def test_seeds_until_resolved_go_where_comparisons_are_open_and_stop_at_the_maximum(data_file, tmp_path):
    from peftlab.studies.runner import open_study

    spec = tiny_spec(data_file, axes={"placement": {"all": "all", "attention": "attention", "ffn": "ffn"}},
                     seeds={"min": 2, "max": 4, "futility": 0})  # futility: the test below
    study_dir = tmp_path / "study"
    store, added = open_study(spec, study_dir)
    assert added == 6
    accuracy = {"placement=all": lambda s: 0.80 + 0.01 * s,
                "placement=attention": lambda s: 0.60 + 0.01 * s + 0.0005 * s * s,  # clearly worse
                "placement=ffn": lambda s: 0.80 + 0.01 * s + 0.04 * (-1) ** s}  # undecided at every look
    seeds = seeds_after_looks(spec, store, study_dir, accuracy, looks=5)
    assert sorted(seeds["placement=attention"]) == [0, 1]  # resolved (worse) at the first look
    assert sorted(seeds["placement=ffn"]) == [0, 1, 2, 3]  # unresolved: seeds up to the maximum, no further
    assert sorted(seeds["placement=all"]) == [0, 1, 2, 3]  # the baseline keeps every comparison paired
    assert all(r["status"] == "done" for r in store.rows())
    from peftlab.analysis.analyze import analyze

    looked = analyze(study_dir, verdicts_only=True)  # what each look computes: outcomes, no power figures
    assert {c.label: c.verdict.outcome for c in looked.configurations if c.verdict} == \
        {"placement=attention": "worse", "placement=ffn": "unresolved"}
    assert all(math.isnan(c.verdict.detectable) for c in looked.configurations if c.verdict)
    assert not looked.recommendations and not looked.limits


def test_a_futile_comparison_gets_no_more_seeds_and_the_report_says_why(data_file, tmp_path):
    from peftlab.analysis.analyze import analyze, verdict_text
    from peftlab.analysis.report import verdict_note
    from peftlab.studies.runner import open_study

    spec = tiny_spec(data_file, axes={"placement": {"all": "all", "ffn": "ffn", "attention": "attention"}},
                     seeds={"min": 3, "max": 6, "step": 3}, margin=0.01)
    study_dir = tmp_path / "study"
    store, _ = open_study(spec, study_dir)
    accuracy = {"placement=all": lambda s: 0.80 + 0.01 * s,
                "placement=attention": lambda s: 0.80 + 0.01 * s + 0.002 * (-1) ** s,  # may still settle
                "placement=ffn": lambda s: 0.80 + 0.01 * s + 0.05 * (-1) ** s}  # ±0.05 against a margin of 0.01
    seeds = seeds_after_looks(spec, store, study_dir, accuracy, looks=4)
    assert sorted(seeds["placement=ffn"]) == [0, 1, 2]  # futile at the first look: no more seeds
    assert len(seeds["placement=attention"]) == len(seeds["placement=all"]) == 6
    analysis = analyze(study_dir, verdicts_only=True)  # (the power figures of ±0.05 against ±0.01 take long)
    ffn = next(c for c in analysis.configurations if c.label == "placement=ffn")
    assert ffn.verdict.outcome == "unresolved" and ffn.verdict.futility < 0.1 and ffn.verdict.stopped_at == 3
    text = verdict_text(ffn.verdict)
    assert text.startswith("unresolved: stopped at 3 seeds, ") and " chance by 6; detects" in text
    assert "Futility: placement=ffn got no more seeds" in verdict_note(analysis)


def test_the_worker_and_a_recovered_run_store_the_same_result_budget_included(data_file, tmp_path):
    from peftlab.records.store import run_dir
    from peftlab.studies.runner import open_study, recover
    from peftlab.studies.worker import execute_study_run
    from peftlab.train.result import RunResult

    spec = tiny_spec(data_file, axes={"placement": {"all": "all"}}, seeds=[0, 1])
    spec.base["budget"] = 2_000
    study_dir = tmp_path / "study"
    store, _ = open_study(spec, study_dir)
    first, second = store.rows()
    status, stored, error = execute_study_run(study_dir, first["id"], json.loads(first["config"]), threads=1)
    assert status == "done" and error is None and set(stored) == set(RunResult("done").to_dict()) - {"config"}
    assert stored["budget"]["target"] == 2_000  # the equal-budget match a report reads
    # a run killed after writing its directory is adopted with the same keys
    store.mark_running(second["id"], None)
    out = run_dir(study_dir, second["id"])
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps({**stored, "config": {"unrelated": True}}))
    assert recover(store, study_dir) == 1
    assert json.loads(store.get(second["id"])["result"]) == stored


def test_run_ids_stay_those_of_studies_made_before_newer_settings():
    """Resuming a study made by an earlier version reruns nothing: settings that do not change what a run
    learns (trackers, training checkpoints, gradient checkpointing) and the device at its default stay out
    of run ids. These ids are the ones the version before those settings gave; a change that moves them
    makes every existing study rerun its runs."""
    from peftlab.studies.grid import learned_config

    base = {"model": "tiny-bert", "task": {"path": "data.jsonl", "kind": "classification"}, "train": {"max_steps": 3}}
    spec = validate(StudySpec, {"name": "ids", "base": base, "axes": {"rank": [2, 4]}, "seeds": [0, 1]}, "s")
    assert [(r.id, r.group) for r in expand(spec)] == [
        ("e6b03fb52c67", "aa5630e970e9"), ("1b1e9e8ea0d5", "aa5630e970e9"),
        ("0ab2ecc0bcc9", "a25c643e36f6"), ("69ccc01dfabc", "a25c643e36f6")]
    settings = {**base, "train": {**base["train"], "checkpoint_every": 5, "gradient_checkpointing": True},
                "tracking": ["tensorboard"]}
    tracked = validate(StudySpec, {**spec.model_dump(), "base": settings}, "s")
    assert [r.id for r in expand(tracked)] == [r.id for r in expand(spec)]
    on_cpu = validate(StudySpec, {**spec.model_dump(), "base": {**base, "train": {"max_steps": 3, "device": "cpu"}}}, "s")
    assert expand(on_cpu)[0].id != expand(spec)[0].id  # an explicit device may change the numbers: its own runs
    assert "device" not in learned_config(expand(spec)[0].config)["train"]
    # seed runs evaluate validation at 75% of their steps (convergence): not part of the id
    assert expand(spec)[0].config["train"]["eval_at"] == [0.75]
    assert "eval_at" not in learned_config(expand(spec)[0].config)["train"]


def test_a_study_whose_data_changed_under_it_refuses_or_reruns_never_reuses(tmp_path, data_file, cli, capsys):
    spec = tiny_spec(data_file, axes={"placement": {"all": "all"}}, seeds=[0, 1])
    study_dir = tmp_path / "study"
    before = {r["id"]: r for r in run_rows(run_study(spec, study_dir, threads=1))}
    assert all(r["status"] == "done" for r in before.values())
    stored = json.loads(open_existing(study_dir).get(next(iter(before)))["result"])
    assert stored["inputs"]["task.path"].startswith("sha256:") and "model" in stored["inputs"]
    assert stored["environment"]["versions"]["peftlab"]["version"]
    # every label flipped: the same config, hence the same run ids, but other data
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    flipped = [{**row, "label": "neg" if row["label"] == "pos" else "pos"} for row in rows]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in flipped))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    code, _, err = cli("study", "run", spec_file, "--dir", study_dir, "--threads", "1")
    assert code == 2 and "inputs changed since 2 finished run(s)" in err and f"task.path {data_file} (changed): 2" in err
    assert "--rerun-changed" in err
    unchanged = {r["id"]: r for r in run_rows(open_existing(study_dir))}
    assert {k: (r["attempts"], r["status"]) for k, r in unchanged.items()} == {k: (1, "done") for k in before}
    after = {r["id"]: r for r in run_rows(run_study(spec, study_dir, threads=1, rerun_changed=True))}
    assert after.keys() == before.keys() and all(r["attempts"] == 2 and r["status"] == "done" for r in after.values())
    again = run_study(spec, study_dir, threads=1)  # now pinned to the new data: nothing reruns
    assert all(r["attempts"] == 2 for r in run_rows(again))
    from peftlab.analysis.analyze import analyze

    provenance = "\n".join(analyze(study_dir).provenance)
    assert "peftlab 0.1.0" in provenance and "Packages: torch 2.13.0" in provenance and "Device: cpu" in provenance
    kernel = json.loads(again.rows()[0]["result"])["environment"]["attn_implementation"]
    assert kernel and f"Arithmetic: fp32, {kernel} attention." in provenance
    assert f"Input task.path: {json.loads(again.rows()[0]['result'])['inputs']['task.path']}." in provenance


def test_runs_of_an_older_peftlab_without_fingerprints_are_reused_with_a_note(tmp_path, data_file, capsys):
    spec = tiny_spec(data_file, axes={"placement": {"all": "all"}}, seeds=[0])
    study_dir = tmp_path / "study"
    store = run_study(spec, study_dir, threads=1)
    row = store.rows()[0]
    old = {k: v for k, v in json.loads(row["result"]).items() if k != "inputs"}  # as an older peftlab stored it
    store.finish(row["id"], "done", old, None)
    capsys.readouterr()
    again = run_study(spec, study_dir, threads=1)
    assert again.rows()[0]["attempts"] == 1
    assert "1 finished run(s) recorded no input fingerprints" in capsys.readouterr().err


def test_the_rate_choice_is_a_function_of_the_stored_rows():
    """Tuning decides from a snapshot of the store's rows: no database, no process."""
    from peftlab.records.results import Snapshot
    from peftlab.records.tuning import chosen_points

    rows, configs = [], {}
    for i, (label, lr, accuracy, status) in enumerate([("a", 1e-3, 0.7, "done"), ("a", 1e-2, 0.9, "done"),
                                                        ("b", 1e-3, 0.8, "done"), ("b", 1e-2, None, "failed"),
                                                        ("c", 1e-3, None, "failed"), ("c", 1e-2, None, "failed"),
                                                        ("d", 1e-3, 0.6, "done"), ("d", 1e-2, None, "running")]):
        rows.append({"id": str(i), "phase": "tune", "label": label, "status": status, "kind": "classification",
                     "metrics.validation.accuracy": accuracy})
        configs[str(i)] = {"train": {"lr": lr}}
    chosen = chosen_points(Snapshot(rows, configs, {}))
    assert chosen["a"] == (1e-2,) and chosen["b"] == (1e-3,) and "d" not in chosen  # d: still tuning
    assert chosen["c"] == "tuning: every learning rate of the grid failed (0.001, 0.01)"


def halving_spec(alpaca_file, rates=(1e-5, 1e-3, 1e-2)):
    return validate(StudySpec, {
        "name": "halving", "seeds": [0], "axes": {"placement": {"all": "all"}},
        "base": {"model": "tiny-llama", "task": {"path": str(alpaca_file), "kind": "instruction"},
                 "plan": {"allocation": 2}, "train": {"max_steps": 6, "batch_size": 4, "latency_batches": 0}},
        "tune": {"lr": list(rates), "seeds": [7], "rungs": [0.34]}}, "test")


def test_successive_halving_stops_the_weaker_rates_and_the_survivor_ends_as_if_uninterrupted(alpaca_file, tmp_path, cli):
    """tune.rungs: three rates train a third of their 6 steps; the best (by validation loss: a causal LM's runs are
    never degenerate there) goes on from its checkpoint to the end and its result equals an uninterrupted tuning
    run's; the others stop there, their checkpoints removed. The configuration's seed run trains at the survivor's
    rate; the report shows where each rate stopped and what tuning spent."""
    from peftlab.analysis.report import tuning_table, write_report
    from peftlab.api import run
    from peftlab.specs import RunConfig
    from peftlab.studies.runner import run_study

    spec = halving_spec(alpaca_file)
    study = tmp_path / "study"
    store = run_study(spec, study, threads=1)
    tuning = {json.loads(r["config"])["train"]["lr"]: r for r in store.rows() if r["phase"] == "tune"}
    finished = [lr for lr, r in tuning.items() if r["status"] == "done"]
    assert len(finished) == 1 and sorted(r["status"] for r in tuning.values()) == ["done", "stopped", "stopped"]
    survivor = tuning[finished[0]]
    assert [p["result"]["cost"]["steps"] for p in json.loads(survivor["rungs"])] == [2]  # round(0.34 x 6)
    assert all(json.loads(r["result"])["cost"]["steps"] == 2 for r in tuning.values() if r["status"] == "stopped")
    assert not list((study / "runs").glob("*.partial"))  # the stopped rates' checkpoints are gone

    config = json.loads(survivor["config"])
    assert "stop_at" not in config["train"]
    whole = run(RunConfig.model_validate(config), tmp_path / "whole").to_dict()
    assert json.loads(survivor["result"])["metrics"] == whole["metrics"]  # exactly, not approximately

    (main,) = [r for r in store.rows() if r["phase"] == "main"]
    assert main["status"] == "done" and json.loads(main["config"])["train"]["lr"] == finished[0]
    analysis, written = write_report(study)
    _, rows = tuning_table(analysis)
    assert sum("stopped at 34% (" in cell for cell in rows[0]) == 2 and rows[0][-1].startswith(f"{finished[0]:g}")
    assert analysis.tuning_steps == (2 + 2 + 6, 3 * 6)  # two rates stopped at step 2, one trained its 6
    assert "Tuning trained 10 optimizer steps, 56% of the 18 of training every rate" in written["markdown"].read_text()
    code, out, _ = cli("study", "status", study)
    assert code == 0 and f"(tuning, lr {finished[0]:g})" in out and out.count("at step 2 of 6") == 2


def test_a_rate_degenerate_at_a_rung_stops_even_when_it_scores_best():
    """records.halving on hand-made rows: at the rung, 3e-3 scores best but predicts one class; 1e-3 goes on."""
    from peftlab.records.halving import halving
    from peftlab.records.results import Snapshot
    from peftlab.specs import TuneSpec

    rows, configs = [], {}
    for i, (lr, accuracy, classes) in enumerate([(1e-4, 0.55, 2), (1e-3, 0.60, 2), (3e-3, 0.66, 1)]):
        rows.append({"id": f"r{i}", "label": "all", "phase": "tune", "status": "stopped", "kind": "classification",
                     "metrics.validation.accuracy": accuracy, "metrics.validation.predicted_classes": classes})
        configs[f"r{i}"] = {"train": {"lr": lr, "stop_at": 0.25}}
    tune = TuneSpec(lr=[1e-4, 1e-3, 3e-3], rungs=[0.25, 0.5])  # keeps a third
    plan = halving(tune, Snapshot(rows, configs, {}))["all"]
    assert plan.promote == {"r1": 0.5}  # to the next rung
    assert plan.stopped == {(1e-4,): "stopped at 25% (0.5500; the best 1 of 3 went on)",
                            (3e-3,): "stopped at 25% (predicts a single class)"}
    assert not plan.decided  # the next rung waits for r1 to reach it
    for row in rows:  # every rate still at the majority class: too early to tell, all go on
        row["metrics.validation.predicted_classes"] = 1
    assert halving(tune, Snapshot(rows, configs, {}))["all"].promote == {"r0": 0.5, "r1": 0.5, "r2": 0.5}
    rows[0]["status"] = "pending"  # a run not at the rung yet: nothing is decided
    assert halving(tune, Snapshot(rows, configs, {}))["all"].promote == {}


def test_successive_halving_ranks_the_points_of_a_grid():
    """With tune.grid a rung compares points (a rate with each grid value), not rates: here one rate and three
    dropouts; the best point goes on, the others stop, each named by its point."""
    from peftlab.records.halving import halving
    from peftlab.records.results import Snapshot
    from peftlab.specs import TuneSpec

    rows, configs = [], {}
    for i, (dropout, accuracy) in enumerate([(0.0, 0.61), (0.1, 0.70), (0.2, 0.64)]):
        rows.append({"id": f"r{i}", "label": "all", "phase": "tune", "status": "stopped", "kind": "classification",
                     "metrics.validation.accuracy": accuracy, "metrics.validation.predicted_classes": 2})
        configs[f"r{i}"] = {"train": {"lr": 1e-3, "stop_at": 0.5}, "model": {"dropout": dropout}}
    tune = TuneSpec(lr=[1e-3], grid={"model.dropout": [0.0, 0.1, 0.2]}, rungs=[0.5])
    plan = halving(tune, Snapshot(rows, configs, {}))["all"]
    assert plan.promote == {"r1": None}  # the last rung: on to the end
    assert plan.stopped == {(1e-3, 0.0): "stopped at 50% (0.6100; the best 1 of 3 went on)",
                            (1e-3, 0.2): "stopped at 50% (0.6400; the best 1 of 3 went on)"}


def test_a_study_database_from_before_successive_halving_takes_stopped_runs(tmp_path):
    import sqlite3

    from peftlab.records.store import Store

    path = tmp_path / "study.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, grp TEXT NOT NULL, label TEXT NOT NULL, seed INTEGER NOT NULL, "
               "axes TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL CHECK (status IN ('pending', 'running', "
               "'done', 'failed')), attempts INTEGER NOT NULL DEFAULT 0, pid INTEGER, created REAL NOT NULL, "
               "started REAL, finished REAL, result TEXT, error TEXT, phase TEXT NOT NULL DEFAULT 'main')")
    db.execute("INSERT INTO runs (id, grp, label, seed, axes, config, status, created, result, phase) VALUES "
               "('a', 'g', 'all', 0, '{}', '{\"train\": {\"stop_at\": 0.5}}', 'done', 1.0, '{\"status\": \"done\"}', 'tune')")
    db.commit()
    db.close()
    store = Store(path)
    assert store.get("a")["status"] == "done" and store.get("a")["result"] == '{"status": "done"}'
    store.finish("a", "stopped", {"status": "stopped"}, None)  # refused by the old CHECK constraint
    assert store.promote("a", {"train": {}}) and store.get("a")["status"] == "pending"
    assert json.loads(store.get("a")["rungs"]) == [{"at": 0.5, "result": {"status": "stopped"}}]


def test_runs_stopped_at_a_rung_an_edited_spec_no_longer_has_go_on():
    """A study whose rungs were edited (or removed) after some runs stopped: they continue to the next rung there
    is, or to the end, instead of waiting for a rung that never comes."""
    from peftlab.records.halving import halving
    from peftlab.records.results import Snapshot
    from peftlab.specs import TuneSpec

    rows = [{"id": "r0", "label": "all", "phase": "tune", "status": "stopped", "kind": "classification"},
            {"id": "r1", "label": "all", "phase": "tune", "status": "pending", "kind": "classification"}]
    configs = {"r0": {"train": {"lr": 1e-3, "stop_at": 0.25}}, "r1": {"train": {"lr": 3e-3, "stop_at": 0.5}}}
    assert halving(TuneSpec(lr=[1e-3, 3e-3], rungs=[0.5]), Snapshot(rows, configs, {}))["all"].promote == {"r0": 0.5}
    assert halving(TuneSpec(lr=[1e-3, 3e-3]), Snapshot(rows, configs, {}))["all"].promote == {"r0": None}


def test_provenance_names_the_arithmetic_and_where_runs_differ_in_it():
    from peftlab.analysis.provenance import provenance_lines

    def row(kernel, forward):
        return {"environment.versions.peftlab.version": "0.1.0", "environment.device": "cpu",
                "environment.mixed_precision": "bf16", "environment.attn_implementation": kernel,
                "environment.attn_implementation_forward": forward}

    lines = provenance_lines([row("eager", "sdpa"), row("eager", "sdpa"), row("sdpa", "sdpa")])
    assert ("Arithmetic: bf16 autocast, eager attention in training and sdpa in evaluation and generation (2 runs); "
            "bf16 autocast, sdpa attention (1 runs).") in lines
    older = {k: v for k, v in row("sdpa", None).items() if "attn" not in k}
    assert "Arithmetic: bf16 autocast, attention kernel not recorded." in provenance_lines([older])
