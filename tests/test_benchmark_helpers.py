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
