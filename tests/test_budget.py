"""The equal-budget helper: each method's size parameter chosen to come closest to a parameter budget."""

import pytest

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.methods.base import trainable_counts
from peftlab.methods.registry import make_method
from peftlab.models.load import count_params, head_modules, load_model
from peftlab.models.sites import resolve_sites
from peftlab.plans.plan import build_plan
from peftlab.resolve.budget import match_budget, method_params, with_size
from peftlab.specs import ModelSpec, RunConfig

ENCODER = ("tiny-bert", "sequence-classification")
DECODER = ("tiny-llama", "causal-lm")
SIZED = [
    (ENCODER, "lora"), (ENCODER, {"name": "lora", "use_dora": True}), (ENCODER, "hira"), (ENCODER, "adalora"),
    (ENCODER, "qlora"), (ENCODER, {"name": "bottleneck", "variant": "houlsby"}),
    (ENCODER, {"name": "bottleneck", "variant": "pfeiffer"}),
    (DECODER, "lora"), (DECODER, "prefix"), (DECODER, {"name": "prefix", "variant": "prompt"}),
]


def config(model, method, **extra):
    return validate(RunConfig, {"model": model, "method": method, "plan": {"placement": "all"}, **extra}, "test")


@pytest.mark.parametrize("arch, method", SIZED, ids=lambda v: str(v.get("variant", v["name"]) if isinstance(v, dict) else v))
def test_the_chosen_size_is_the_closest_and_real(arch, method):
    name, head = arch
    spec = ModelSpec(name=name, head=head)
    budget = 9_000
    sized, match = match_budget(config(name, method), spec, budget)
    assert match.size is not None and match.size >= 1
    neighbours = [method_params(with_size(sized, s), spec) for s in (match.size - 1, match.size + 1) if s >= 1]
    assert all(abs(match.params - budget) <= abs(n - budget) for n in neighbours)
    # the count on the meta skeleton is what the method trains on the real model
    model = load_model(spec)
    plan = build_plan(resolve_sites(model), count_params(model), sized.plan, name)
    heads = head_modules(model)
    applied = make_method(sized.method, total_steps=100).apply(model, plan, heads)
    assert trainable_counts(applied, heads)["adapter"] == match.params


def test_methods_without_a_size_report_their_count():
    spec = ModelSpec(name=ENCODER[0], head=ENCODER[1])
    _, match = match_budget(config(ENCODER[0], "bitfit"), spec, 10_000)
    assert match.size is None and match.params == 1280  # every bias of the 2-layer, 64-wide BERT


def test_an_unreachable_budget_is_a_clear_error():
    spec = ModelSpec(name=ENCODER[0], head=ENCODER[1])
    with pytest.raises(PeftlabError, match="out of reach for method bottleneck .* lower the budget"):
        match_budget(config(ENCODER[0], {"name": "bottleneck", "variant": "pfeiffer"}), spec, 10_000_000)


def test_a_run_with_a_budget_records_its_size(tmp_path):
    from conftest import run_to_dict

    rows = [{"text": f"row {i} {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(40)]
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    run = validate(RunConfig, {
        "model": ENCODER[0], "task": {"path": str(data), "kind": "classification"},
        "method": {"name": "bottleneck", "variant": "houlsby"}, "budget": 5_000,
        "train": {"max_steps": 2, "batch_size": 8, "latency_batches": 0},
    }, "test")
    result = run_to_dict(run, tmp_path / "run")
    assert result["budget"]["parameter"] == "rank" and result["budget"]["target"] == 5_000
    assert result["cost"]["adapter_params"] == result["budget"]["params"]


def test_a_budget_match_does_not_change_what_the_run_initializes(tmp_path):
    """Searching the size builds skeletons, which draw from the random generator; it happens before the
    run's seed is set, so a budget that lands on the configured rank trains exactly the unbudgeted run."""
    from conftest import run_to_dict

    rows = [{"text": f"row {i} {'good' if i % 2 else 'bad'} {'x' * (i % 7)}", "label": i % 2} for i in range(40)]
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    base = {"model": ENCODER[0], "task": {"path": str(data), "kind": "classification"},
            "plan": {"placement": "all", "allocation": 4}, "train": {"max_steps": 3, "batch_size": 8, "latency_batches": 0}}
    plain = validate(RunConfig, base, "test")
    exact = method_params(plain, ModelSpec(name=ENCODER[0], head=ENCODER[1]))
    budgeted = validate(RunConfig, {**base, "budget": exact}, "test")
    one, two = run_to_dict(plain, tmp_path / "plain"), run_to_dict(budgeted, tmp_path / "budget")
    assert two["budget"]["size"] == 4
    assert two["final_train_loss"] == one["final_train_loss"]
    assert two["metrics"]["test"]["loss"] == one["metrics"]["test"]["loss"]
