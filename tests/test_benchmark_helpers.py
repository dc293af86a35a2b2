"""The benchmark scripts' shared helpers still fit the library's interfaces (the scripts themselves run on demand)."""

import json

import pytest

from peftlab.specs import ModelSpec, PlanSpec, RunConfig, TaskSpec, TrainSpec

pytestmark = pytest.mark.usefixtures("private_cache")


def test_the_peft_baseline_is_built_on_the_same_model_and_data(tmp_path, reviews_file):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        from common import peft_model_and_data
    finally:
        sys.path.pop(0)
    config = RunConfig(model=ModelSpec(name="tiny-bert"), task=TaskSpec(path=reviews_file, kind="classification"),
                       plan=PlanSpec(allocation=2), train=TrainSpec(max_steps=2, batch_size=4))
    model, data, pad_id = peft_model_and_data(config)
    assert model.peft_config["default"].r == 2 and data.kind == "classification" and isinstance(pad_id, int)
    assert json.dumps(data.labels) == '["neg", "pos"]'


def test_study_cost_counts_steps_by_phase_against_the_tuning_s_full_budget():
    import sys
    from pathlib import Path

    from peftlab.records.results import Snapshot

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        from study_cost import study_cost
    finally:
        sys.path.pop(0)
    row = {"started": 10.0, "finished": 20.0, "cost.train_seconds": 1.5}
    rows = [{**row, "phase": "tune", "status": "stopped", "cost.steps": 2, "cost.planned_steps": 6},
            {**row, "phase": "tune", "status": "done", "cost.steps": 6, "cost.planned_steps": 6},
            {**row, "phase": "main", "status": "done", "cost.steps": 6, "cost.planned_steps": 6, "finished": 40.0}]
    cost = study_cost(Snapshot(rows, {}, {}))
    assert cost["tune"] == {"runs": {"stopped": 1, "done": 1}, "steps": 8, "train_seconds": 3.0, "full_budget_steps": 12}
    assert cost["main"]["steps"] == 6 and cost["wall_seconds"] == 30.0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_gpu_checks_run_end_to_end_in_a_dry_run(tmp_path):
    """benchmarks/gpu.py --dry-run: every GPU check on tiny models on this CPU, figures into its own directory
    (none into benchmarks/results), each check done with the figures its summary keeps."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    results = root / "benchmarks" / "results"
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--dry-run", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu.jsonl").read_text().splitlines()[-1])
    checks = summary["checks"]
    assert summary["dry_run"] and list(checks) == ["speed-gemma", "speed-1b", "qlora-memory", "generation", "two-processes"]
    assert all(c["status"] == "done" for c in checks.values()), checks
    gemma = checks["speed-gemma"]["harnesses"]
    assert set(gemma) == {"trainer", "peftlab-packed"} and gemma["peftlab-packed"]["padding_fraction"] == 0.0
    assert gemma["peftlab-packed"]["vs_trainer"] > 0 and gemma["trainer"]["tokens_per_second"] > 0
    assert len(checks["generation"]["figures"]) == 4
    runs = checks["two-processes"]["runs"]
    assert all(runs[name]["speed_up"] > 0 for name in ("one-process", "two-processes", "two-sharded"))
    assert runs["two-processes"]["params_per_process"] is None  # data parallel: every process holds the model
    assert 0 < runs["two-sharded"]["params_per_process"]
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jsonl")}
    assert {"speed-gemma/speed.jsonl", "speed-1b/speed.jsonl", "qlora-memory/qlora_memory.jsonl",
            "generation/generation.jsonl", "gpu.jsonl"} <= written
    assert {p.name: p.read_bytes() for p in results.iterdir()} == before
