"""Plan -> PEFT LoraConfig -> get_peft_model wraps exactly the planned modules with the planned ranks."""

import pytest
from conftest import make_plan
from peft import LoraConfig, get_peft_model

from peftlab.errors import PeftlabError, PlanMismatchError
from peftlab.models.load import load_model
from peftlab.plans.peft_export import (
    lora_config_kwargs,
    verify_wrapped,
    wrapped_modules,
)
from peftlab.specs import ModelSpec

CASES = [
    ("tiny-gpt2", {"placement": "attention", "allocation": 8}),
    ("tiny-gpt2", {"placement": "all", "allocation": "linear(8->2)"}),
    ("tiny-bert", {"placement": "attention", "allocation": 4}),
    ("tiny-bert", {"placement": {"roles": "ffn", "layers": "upper-half"}, "allocation": 4, "alpha": "16"}),
    ("tiny-distilbert", {"placement": "all", "allocation": "attention-heavy(2)"}),
    ("tiny-llama", {"placement": "all", "allocation": "linear(16->4)"}),
    ("tiny-llama", {"placement": {"roles": "q,v", "layers": "every-2nd"}, "allocation": "budget(3000)"}),
]


def lora_trainable(model):
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


@pytest.mark.parametrize("name, plan_values", CASES)
def test_peft_wraps_exactly_the_plan(name, plan_values):
    plan = make_plan(name, **plan_values)
    model = get_peft_model(load_model(ModelSpec(name=name)), LoraConfig(**lora_config_kwargs(plan)))
    verify_wrapped(model, plan)
    wrapped = wrapped_modules(model)
    assert {path: rank for path, (rank, _) in wrapped.items()} == {p.site.path: p.rank for p in plan.sites}
    assert lora_trainable(model) == plan.trainable_params


def test_layer_varying_ranks_survive_the_export():
    plan = make_plan("tiny-llama", placement="o", allocation="linear(16->4)")
    kwargs = lora_config_kwargs(plan)
    assert kwargs["r"] in {16, 12, 8, 4} and len(kwargs["rank_pattern"]) == 3
    model = get_peft_model(load_model(ModelSpec(name="tiny-llama")), LoraConfig(**kwargs))
    ranks = [wrapped_modules(model)[f"model.layers.{i}.self_attn.o_proj"][0] for i in range(4)]
    assert ranks == [16, 12, 8, 4]


def test_suffix_targets_are_caught_by_the_check():
    # The classic mistake: "attention only" written as PEFT suffixes also adapts mlp.c_proj.
    plan = make_plan("tiny-gpt2", placement="attention", allocation=8)
    model = get_peft_model(
        load_model(ModelSpec(name="tiny-gpt2")),
        LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    )
    with pytest.raises(PlanMismatchError, match="unplanned transformer.h.0.mlp.c_proj"):
        verify_wrapped(model, plan)


def test_slices_of_a_fused_projection_cannot_go_to_peft():
    plan = make_plan("tiny-gpt2", placement="q,v", allocation=8)
    with pytest.raises(PeftlabError, match="slice of the fused projection"):
        lora_config_kwargs(plan)


def test_readme_example():
    from peftlab.api import make_plan as api_make_plan
    from peftlab.specs import PlanConfig

    plan = api_make_plan(PlanConfig.model_validate({"model": "tiny-llama", "plan": {"allocation": "linear(16->4)"}}))
    model = get_peft_model(load_model(ModelSpec(name="tiny-llama")), LoraConfig(**lora_config_kwargs(plan)))
    verify_wrapped(model, plan)
    assert [p.rank for p in plan.sites if p.site.role.value == "attn.q"] == [16, 12, 8, 4]
