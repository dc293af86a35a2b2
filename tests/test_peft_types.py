"""PEFT's other methods on peftlab's plans (`method: {name: peft, type: ...}`): placement as exact paths, ranks
per site, sizes that are not ranks, equal budgets, and one line for what a type cannot do."""

import pytest
import torch
from conftest import make_plan

from peftlab.config import validate
from peftlab.errors import PeftlabError, PlanMismatchError
from peftlab.methods.registry import make_method
from peftlab.methods.specs import PeftTypeSpec
from peftlab.models.load import head_modules, load_model
from peftlab.plans.peft_export import verify_wrapped, wrapped_modules
from peftlab.resolve.budget import match_budget, method_params
from peftlab.specs import ModelSpec, RunConfig


def applied(peft_type, arch="tiny-llama", allocation=4, placement="all", **options):
    model = load_model(ModelSpec(name=arch), seed=0)
    method = make_method(PeftTypeSpec(type=peft_type, options=options))
    plan = make_plan(arch, placement=placement, allocation=allocation)
    return method, method.apply(model, plan, head_modules(model)), plan


def run_config(method, model="tiny-llama", **plan):
    return validate(RunConfig, {"model": model, "task": {"path": "d.jsonl", "kind": "instruction"},
                                "method": method, "plan": plan or {"placement": "all"}}, "test")


@pytest.mark.parametrize("peft_type", ["LOHA", "LOKR"])
def test_each_site_gets_its_planned_rank_and_alpha(peft_type):
    allocation = {"kind": "linear", "first": 2, "last": 8}
    method, model, plan = applied(peft_type, allocation=allocation)
    ranks = {p.site.path: p.rank for p in plan.sites}
    assert len(set(ranks.values())) > 1  # the plan really varies
    wrapped = wrapped_modules(model, layer_class=method.type.layer_class(), size="r", alpha="alpha")
    assert {path: rank for path, (rank, _) in wrapped.items()} == ranks
    assert {path: alpha for path, (_, alpha) in wrapped.items()} == {p.site.path: p.alpha for p in plan.sites}


def test_a_wrapped_size_that_differs_from_the_plan_is_refused():
    method, model, plan = applied("LOHA")
    path = plan.sites[0].site.path
    expected = {p.site.path: (p.rank, p.alpha) for p in plan.sites} | {path: (plan.sites[0].rank + 1, plan.sites[0].alpha)}
    with pytest.raises(PlanMismatchError, match="size/alpha"):
        verify_wrapped(model, plan, layer_class=method.type.layer_class(), size="r", alpha="alpha", expected=expected)


@pytest.mark.parametrize("peft_type, reason", [("VERA", "takes one rank for every site"),
                                               ("IA3", "has no size"), ("FOURIERFT", "its size is n_frequency")])
def test_types_without_per_site_ranks_refuse_a_varying_allocation(peft_type, reason):
    with pytest.raises(PeftlabError, match=f"{reason}.*use a uniform allocation"):
        applied(peft_type, allocation={"kind": "linear", "first": 2, "last": 8})


def test_ia3_scales_the_down_projections_input_and_the_others_output():
    method, model, plan = applied("IA3")
    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, method.type.layer_class())}
    for p in plan.sites:
        vector = layers[p.site.path].ia3_l["default"]
        width = p.site.in_features if p.site.role.short == "down" else p.site.out_features
        assert vector.numel() == width and torch.equal(vector, torch.ones_like(vector))


def test_a_block_size_must_divide_every_input_width_and_the_budget_picks_one_that_does():
    with pytest.raises(PeftlabError, match=r"oft_block_size: 5 does not divide the input widths \[64, 128\]"):
        applied("OFT", oft_block_size=5)
    config = run_config({"name": "peft", "type": "OFT"})
    sized, match = match_budget(config, config.model, 3_000)
    assert match.parameter == "oft_block_size" and 64 % match.size == 0 and 128 % match.size == 0
    assert sized.method.options["oft_block_size"] == match.size
    assert method_params(sized, config.model) == match.params
    for other in (2, 4, 8, 16, 32, 64):  # no divisor comes closer
        nearer = abs(method_params(with_block(config, other), config.model) - 3_000) < abs(match.params - 3_000)
        assert not nearer, other


def with_block(config, size):
    return config.model_copy(update={"method": config.method.model_copy(update={"options": {"oft_block_size": size}})})


def test_the_budget_sets_fourierft_frequencies_and_a_rank_types_rank():
    config = run_config("peft:fourierft")
    sized, match = match_budget(config, config.model, 3_000)
    assert match.parameter == "n_frequency" and sized.method.options == {"n_frequency": match.size}
    assert abs(match.params - 3_000) <= 14 // 2 + 1  # 14 sites: one frequency more adds 14 parameters
    loha = run_config("peft:loha")
    _, match = match_budget(loha, loha.model, 20_000)
    assert match.parameter == "rank" and match.size == 2 and match.params == 16_384


def test_a_type_without_a_size_reports_its_count_under_a_budget():
    config = run_config("peft:ia3")
    sized, match = match_budget(config, config.model, 100)
    assert sized == config and match.parameter is None and match.params == method_params(config, config.model)


def test_what_a_type_cannot_do_is_one_line():
    with pytest.raises(PeftlabError, match="cannot adapt GPT-2's Conv1D"):
        applied("LOHA", arch="tiny-gpt2")
    with pytest.raises(PeftlabError, match="slice of the fused projection"):
        applied("VERA", arch="tiny-gpt2", placement={"roles": ["q", "v"]})
    with pytest.raises(ValueError, match="options.not_a_field: not a field of PEFT's LoKrConfig; its fields: "
                                         "decompose_both, decompose_factor"):
        applied("LOKR", not_a_field=1)  # refused by the spec, before anything loads


def test_the_spec_takes_a_shorthand_and_keeps_plan_fields_for_the_plan():
    assert run_config("peft:LoHa").method == PeftTypeSpec(type="LOHA")
    with pytest.raises(PeftlabError, match=r"options \['r', 'target_modules'\] come from the plan"):
        run_config({"name": "peft", "type": "loha", "options": {"target_modules": ["q"], "r": 4}})
    with pytest.raises(PeftlabError, match="method.type"):
        run_config({"name": "peft", "type": "NOT_A_TYPE"})


def test_a_run_trains_and_records_its_type_and_count(tmp_path, cli):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"instruction": "say {w}", "output": "{w} {w}"}}\n' for w in ["red", "blue"] * 12))
    code, out, err = cli("run", "--model", "tiny-llama", "--data", data, "--kind", "instruction",
                         "--method", "peft:vera", "--max-steps", "2", "--output", tmp_path / "run")
    assert code == 0, err
    import json

    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["config"]["method"] == {"name": "peft", "type": "VERA", "options": {}}
    assert result["cost"]["adapter_params"] == result["cost"]["plan_params"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert set(result["cost"]["latency_ms_per_batch"]) == {"unmerged", "merged", "base"}
