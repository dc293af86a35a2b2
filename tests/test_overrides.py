"""Flags and study axes change exactly the field they name: a shorthand in the file (`placement: [q, v]`,
`task: reviews`, `method: qlora`, `alpha: 16`, `allocation: attention-heavy(8)`) is expanded by its own spec
first, so the rest of the setting survives; a flag that cannot compose with the file is an error."""

import json

import pytest

from peftlab.config import load_spec, set_dotted, validate
from peftlab.errors import PeftlabError
from peftlab.specs import RunConfig, StudySpec
from peftlab.studies.grid import expand

# (file's setting, dotted override, value, what the resolved config must hold)
CASES = [
    ("plan: {placement: [q, v]}", "plan.placement.layers", "upper-half",
     lambda c: c.plan.placement.roles == ["q", "v"] and c.plan.placement.layers == "upper-half"),
    ("plan: {placement: ffn}", "plan.placement.layers", "0,1",
     lambda c: c.plan.placement.roles == "ffn" and c.plan.placement.layers == "0,1"),
    ("plan: {alpha: 16}", "plan.alpha.policy", "ratio",
     lambda c: c.plan.alpha.policy == "ratio" and c.plan.alpha.value == 16),
    ("plan: {alpha: 2r}", "plan.alpha.value", 4.0,
     lambda c: c.plan.alpha.policy == "ratio" and c.plan.alpha.value == 4),
    ("task: reviews", "task.max_length", 64, lambda c: c.task.name == "reviews" and c.task.max_length == 64),
    ("method: qlora", "method.double_quant", False, lambda c: c.method.name == "qlora" and not c.method.double_quant),
    ("method: lora", "method.dropout", 0.1, lambda c: c.method.name == "lora" and c.method.dropout == 0.1),
    ("model: tiny-bert", "model.dropout", 0.0, lambda c: c.model.name == "tiny-bert" and c.model.dropout == 0.0),
    ("plan: {allocation: attention-heavy(8)}", "plan.allocation.rank", 4,
     lambda c: c.plan.allocation.kind == "role-weighted" and c.plan.allocation.rank == 4
     and c.plan.allocation.weights == {"attn": 2.0, "ffn": 1.0}),
    ("plan: {allocation: 8}", "plan.allocation.rank", 4, lambda c: c.plan.allocation.rank == 4),
    ("plan: {allocation: 'budget(100000, attention-heavy(8))'}", "plan.allocation.params", 50000,
     lambda c: c.plan.allocation.params == 50000 and c.plan.allocation.shape_.kind == "role-weighted"),
    ("{}", "plan.allocation.rank", 4, lambda c: c.plan.allocation.kind == "uniform" and c.plan.allocation.rank == 4),
]


@pytest.mark.parametrize("setting,dotted,value,holds", CASES, ids=[f"{c[0]} + {c[1]}" for c in CASES])
def test_an_override_keeps_the_rest_of_a_shorthand(tmp_path, setting, dotted, value, holds):
    path = tmp_path / "run.yaml"
    path.write_text(setting + "\n")
    assert holds(load_spec(RunConfig, path, {dotted: value}))


@pytest.mark.parametrize("setting,dotted,value,holds", CASES, ids=[f"{c[0]} + {c[1]}" for c in CASES])
def test_a_study_axis_keeps_the_rest_of_a_shorthand_in_base(tmp_path, setting, dotted, value, holds):
    import yaml

    spec = validate(StudySpec, {"name": "s", "base": yaml.safe_load(setting) or {}, "axes": {dotted: [value]},
                                "seeds": [0, 1]}, "test")
    runs = expand(spec)
    assert len(runs) == 2 and not any(r.error for r in runs)
    assert all(holds(RunConfig.model_validate(r.config)) for r in runs)


def test_layers_over_a_q_v_placement_plans_q_and_v_only(tmp_path, cli):
    config = tmp_path / "plan.yaml"
    config.write_text("model: tiny-llama\nplan: {placement: [q, v]}\n")
    code, out, err = cli("plan", "--config", config, "--layers", "upper-half", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert {s["role"] for s in data["sites"]} == {"attn.q", "attn.v"}
    assert {s["layer"] for s in data["sites"]} == {2, 3}
    assert data["totals"]["trainable_params"] == 3584  # not 16,384 (all 7 roles)


def test_rank_flag_keeps_the_shape_of_the_files_allocation(tmp_path, cli):
    config = tmp_path / "plan.yaml"
    config.write_text("model: tiny-llama\nplan: {allocation: attention-heavy(8)}\n")
    code, out, err = cli("plan", "--config", config, "--rank", "4", "--json")
    assert code == 0, err
    ranks = {s["role"]: s["rank"] for s in json.loads(out)["sites"]}
    assert ranks["attn.q"] == 8 and ranks["ffn.up"] == 4  # attention-heavy(4), not uniform(4)


def test_rank_flag_over_an_allocation_without_a_base_rank_names_the_conflict(tmp_path, cli):
    config = tmp_path / "plan.yaml"
    config.write_text("model: tiny-llama\nplan: {allocation: linear(8->2)}\n")
    code, out, err = cli("plan", "--config", config, "--rank", "4")
    assert code == 2 and out == ""
    assert "plan.allocation is 'linear', which has no field 'rank'" in err and str(config) in err
    assert len(err.strip().splitlines()) == 1


def test_max_length_flag_with_a_task_shorthand_runs(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: reviews\n")
    config = load_spec(RunConfig, path, {"task.max_length": 64, "plan.placement.roles": "q,v"})
    assert config.task.name == "reviews" and config.task.max_length == 64
    assert config.plan.placement.roles == "q,v"


def test_an_invalid_shorthand_is_reported_where_it_is_written():
    with pytest.raises(PeftlabError, match=r"^f.yaml: plan.placement.roles: unknown role 'bogus'"):
        set_dotted(RunConfig, {"plan": {"placement": "bogus"}}, "plan.placement.layers", "all", "f.yaml")


def test_a_rank_axis_composes_with_the_base_allocation_or_names_the_conflict():
    base = {"plan": {"allocation": "ffn-heavy(8)"}}
    runs = expand(validate(StudySpec, {"name": "s", "base": base, "axes": {"rank": [4, 16]}}, "test"))
    assert sorted(RunConfig.model_validate(r.config).plan.allocation.rank for r in runs) == [4, 16]
    assert {RunConfig.model_validate(r.config).plan.allocation.kind for r in runs} == {"role-weighted"}
    linear = expand(validate(StudySpec, {"name": "s", "base": {"plan": {"allocation": "linear(8->2)"}},
                                         "axes": {"rank": [4]}}, "test"))
    assert linear[0].error and "has no field 'rank'" in linear[0].error
