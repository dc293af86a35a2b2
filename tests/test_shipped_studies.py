"""Every shipped study validates, expands to valid runs, and plans on the meta device."""

import json
import random

import pytest

from peftlab.api import make_plan
from peftlab.config import load_spec
from peftlab.specs import PlanConfig, RunConfig, StudySpec
from peftlab.studies.grid import expand
from peftlab.studies.shipped import shipped_studies


def with_probe_scores(config: RunConfig, path) -> RunConfig:
    """An importance allocation pointed at a scores file, as a run does after its probe."""
    allocation = config.plan.allocation
    inner = getattr(allocation, "shape_", allocation)
    if inner.kind != "importance":
        return config
    inner = inner.model_copy(update={"scores": path})
    if allocation.kind == "budget":
        inner = allocation.model_copy(update={"shape_": inner})
    return config.model_copy(update={"plan": config.plan.model_copy(update={"allocation": inner})})


@pytest.fixture
def random_scores(tmp_path):
    """A score for every (layer, role) of the shipped studies' models (6-layer BERT, 18-layer Gemma 3), drawn
    at random."""
    rng = random.Random(0)
    path = tmp_path / "scores.json"
    roles = ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate", "ffn.down"]
    path.write_text(json.dumps([{"layer": i, "role": r, "score": rng.uniform(0.1, 3)} for i in range(18) for r in roles]))
    return path


@pytest.mark.parametrize("name", sorted(shipped_studies()))
def test_shipped_study_expands_to_valid_runs(name, random_scores):
    spec = load_spec(StudySpec, shipped_studies()[name])
    assert spec.name == name and len(spec.seeds) >= 3
    # studies that reach an answer: rates tuned on validation, seeds added until comparisons resolve
    assert spec.tune is not None and spec.until_resolved is not None and spec.margin is not None
    runs = expand(spec)
    assert runs and all(r.error is None for r in runs), [r.error for r in runs if r.error]
    for run in runs:
        config = with_probe_scores(RunConfig.model_validate(run.config), random_scores)
        make_plan(PlanConfig(model=config.model, plan=config.plan))  # every plan resolves


def test_shipped_studies_exist():
    assert {"placement", "allocation", "methods", "importance"} <= set(shipped_studies())


def test_importance_study_compares_at_the_uniform_budget(random_scores):
    spec = load_spec(StudySpec, shipped_studies()["importance"])
    budgets = {}
    for run in expand(spec):
        config = with_probe_scores(RunConfig.model_validate(run.config), random_scores)
        budgets[run.axes["allocation"]] = make_plan(PlanConfig(model=config.model, plan=config.plan)).trainable_params
    reference = budgets.pop("uniform-8")
    assert set(budgets) == {"gradient", "fisher", "activation", "update", "adalora"}
    for name, params in budgets.items():
        assert abs(params - reference) / reference < 0.03, (name, params, reference)


def test_allocation_study_compares_at_comparable_budgets():
    spec = load_spec(StudySpec, shipped_studies()["allocation"])
    budgets = {}
    for run in expand(spec):  # with tuning: the tuning runs, which share the configurations' plans
        if run.axes["allocation"] not in budgets:
            config = RunConfig.model_validate(run.config)
            budgets[run.axes["allocation"]] = make_plan(PlanConfig(model=config.model, plan=config.plan)).trainable_params
    reference = budgets.pop("uniform-8")
    assert budgets.pop("uniform-16") == 2 * reference
    for name, params in budgets.items():
        assert abs(params - reference) / reference < 0.03, (name, params, reference)


def test_placement_study_compares_at_equal_rank():
    spec = load_spec(StudySpec, shipped_studies()["placement"])
    configs = [RunConfig.model_validate(r.config) for r in expand(spec)]
    ranks = {p.rank for c in configs for p in make_plan(PlanConfig(model=c.model, plan=c.plan)).sites}
    assert ranks == {8}


def test_methods_study_compares_at_an_equal_budget():
    from peftlab.resolve.budget import match_budget, method_params
    from peftlab.specs import ModelSpec

    spec = load_spec(StudySpec, shipped_studies()["methods"])
    sizes = {}
    for run in expand(spec):  # with tuning: the tuning runs, which share the configurations' sizes
        if run.axes["variant"] not in sizes:
            config = RunConfig.model_validate(run.config)
            model = ModelSpec(name=config.model.name, head="sequence-classification", num_labels=2)
            if config.budget is None:  # methods far smaller by construction run at their own size
                sizes[run.axes["variant"]] = method_params(config, model)
                continue
            _, match = match_budget(config, model, config.budget)
            sizes[run.axes["variant"]] = match
    assert sizes["lora"].size == 8 and sizes["lora"].params == spec.base["budget"]
    for variant in ("dora", "lora-plus", "qlora", "hira", "loha", "adalora", "houlsby", "pfeiffer"):
        # within half a rank step (1/16 of the budget at r=8): DoRA sits exactly between r=7 and r=8
        assert abs(sizes[variant].params - sizes["lora"].params) / sizes["lora"].params <= 1 / 16, (variant, sizes[variant])
    assert sizes["houlsby"].size != 8 and sizes["pfeiffer"].size > sizes["houlsby"].size  # widths, not ranks
    assert sizes["bitfit"].size is None and sizes["bitfit"].params < sizes["lora"].params
    assert sizes["loha"].size == 4 and sizes["loha"].params == spec.base["budget"]  # 2r(in + out) per site
    for variant in ("lokr", "ia3", "vera"):  # each below a tenth of the budget: not an equal-budget comparison
        assert 20_000 < sizes[variant] < spec.base["budget"] / 10, (variant, sizes[variant])


@pytest.mark.parametrize("name", ["instruct-placement", "instruct-allocation"])
def test_instruct_studies_tune_a_causal_lm_on_the_bundled_data_and_score_generations(name):
    spec = load_spec(StudySpec, shipped_studies()[name])
    config = RunConfig.model_validate(expand(spec)[0].config)
    assert config.model.name == "gemma-3-270m" and config.task.name == "reviews-instruct"
    assert config.eval.generate is not None and config.method.name == "lora" and config.method.dropout == 0.1


def test_study_data_and_settings_override_the_base(tmp_path, cli):
    from peftlab.errors import PeftlabError
    from peftlab.studies.grid import with_base_overrides

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 10))
    spec = load_spec(StudySpec, shipped_studies()["instruct-placement"])
    changed = with_base_overrides(spec, data, ["task.max_train_examples=40", "seeds=[0, 1, 2, 3]", "until_resolved=null",
                                               "eval.generate.max_new_tokens=64"])
    assert changed.seeds == [0, 1, 2, 3] and changed.until_resolved is None and changed.tune == spec.tune
    assert changed.description.startswith(spec.description.rstrip())  # the report says what was changed
    assert changed.description.endswith(f"Changed from its spec by: --data {data}; --set task.max_train_examples=40; "
                                        "--set seeds=[0, 1, 2, 3]; --set until_resolved=null; "
                                        "--set eval.generate.max_new_tokens=64.")
    config = RunConfig.model_validate(expand(changed)[0].config)
    assert config.task.name is None and config.task.path == data and config.task.kind == "instruction"
    assert config.task.max_train_examples == 40 and config.task.max_length == 128  # the rest of the task is kept
    assert config.eval.generate.max_new_tokens == 64 and config.eval.generate.examples == 100
    with pytest.raises(PeftlabError, match="use KEY=VALUE"):
        with_base_overrides(spec, None, ["task.max_train_examples"])
    with pytest.raises(PeftlabError, match="has no field 'max_train_exmaples'"):
        with_base_overrides(spec, None, ["task.max_train_exmaples=3"])

    code, out, err = cli("study", "run", "instruct-placement", "--data", data, "--set", "task.max_train_examples=40",
                         "--dry-run")
    assert code == 0, err
    assert "studies/instruct-placement-alpaca" in out.replace("\n", "") and "nothing was written" in out


def test_glue_lora_trains_the_lora_paper_s_parameter_counts():
    """RoBERTa-base, q and v, r = 8: 294,912 LoRA parameters (the LoRA paper's 0.3M); BitFit's 0.1M."""
    spec = load_spec(StudySpec, shipped_studies()["glue-lora"])
    counts = {}
    for run in expand(spec):
        config = RunConfig.model_validate(run.config)
        counts[run.axes["variant"]] = make_plan(PlanConfig(model=config.model, plan=config.plan)).trainable_params
    assert counts["lora"] == 294_912
    assert set(spec.references) == {"variant=lora", "variant=full", "variant=bitfit"} and spec.metric == "accuracy"


def test_metamath_gsm8k_counts_as_peft_s_method_comparison_does():
    """Llama-3.2-3B, q and v, r = 32: 9,175,040 LoRA parameters and 3,212,749,824 in the model, PEFT's figures."""
    spec = load_spec(StudySpec, shipped_studies()["metamath-gsm8k"])
    plans = {}
    for run in expand(spec):
        config = RunConfig.model_validate(run.config)
        plans[run.axes["variant"]] = make_plan(PlanConfig(model=config.model, plan=config.plan))
    assert plans["lora"].trainable_params == 9_175_040 and plans["lora"].base_params == 3_212_749_824
    assert spec.metric == "metrics.benchmarks.gsm8k.exact_match_flexible-extract"
    assert RunConfig.model_validate(expand(spec)[0].config).eval.benchmarks.tasks == ["gsm8k"]
