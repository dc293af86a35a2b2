"""Bias and norm modes of a plan (`plan.bias`, `plan.norms`): counted in the plan, trained under every method's
wrappers, saved beside the adapter and loaded back to the same outputs."""

import pytest
import torch
from conftest import make_plan

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.methods.base import trainable_counts
from peftlab.methods.registry import make_method
from peftlab.methods.specs import AdaLoraSpec, BottleneckSpec, HiraSpec, LoraSpec, QLoraSpec
from peftlab.models.load import head_modules, load_model
from peftlab.plans.extras import FILE, load_extras, save_extras, train_extras
from peftlab.specs import ModelSpec, RunConfig


def test_biases_and_norms_are_counted_in_the_plan():
    plan = make_plan("tiny-bert", placement="attention", allocation=4, bias="adapted", norms=True)
    # q, k, v, o of 2 layers: 8 biases of 64; norms: the embeddings' and 2 per layer, weight and bias of 64 each
    assert plan.adapter_params == 8 * 4 * (64 + 64) and plan.extra_params == 8 * 64 + 5 * 2 * 64
    assert plan.trainable_params == plan.adapter_params + plan.extra_params
    totals = plan.totals()
    assert (totals["bias_params"], totals["norm_params"]) == (512, 640)
    every = make_plan("tiny-bert", placement="attention", allocation=4, bias="all")
    # every bias but the classifier's (as PEFT's bias="all"): q, k, v, o, intermediate (128), output (64) per layer,
    # the pooler's, and the 5 LayerNorms' biases
    assert every.extra_params == 2 * (4 * 64 + 128 + 64) + 64 + 5 * 64
    assert "classifier.bias" not in {e.name for e in every.extra}
    llama = make_plan("tiny-llama", placement="all", allocation=4, bias="all", norms=True)
    assert llama.totals()["bias_params"] == 0 and llama.totals()["norm_params"] == (2 * 4 + 1) * 64  # 4 layers, RMSNorm
    assert make_plan("tiny-bert", placement="attention", allocation=4).extra == ()


def tiny_bert():
    return load_model(ModelSpec(name="tiny-bert", head="sequence-classification"), seed=0)


def logits(model):
    model.eval()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(200, 2000, (2, 9), generator=g), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("spec", [LoraSpec(), HiraSpec(), AdaLoraSpec(), BottleneckSpec()], ids=lambda s: s.name)
def test_planned_biases_and_norms_train_save_and_reload_under_each_method(spec, tmp_path):
    plan = make_plan("tiny-bert", placement="all", allocation=4, bias="adapted", norms=True)
    base = tiny_bert()
    head = head_modules(base)
    method = make_method(spec, total_steps=10)
    model = method.apply(base, plan, head)
    before = trainable_counts(model, head)["adapter"]
    train_extras(model, plan.extra)
    assert trainable_counts(model, head)["adapter"] == before + plan.extra_params
    with torch.no_grad():  # as if trained: the extras and the adapters move
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    trained = logits(model)
    method.save(model, tmp_path / "adapter")
    save_extras(model, plan.extra, tmp_path / "adapter")
    assert (tmp_path / "adapter" / FILE).is_file()
    fresh_method = make_method(spec, total_steps=10)
    fresh = fresh_method.apply(tiny_bert(), plan, head)
    without = logits(fresh_method.load(fresh, tmp_path / "adapter"))
    if spec.name != "bottleneck":  # (its own file keeps every trainable parameter, the extras too)
        assert not torch.allclose(without, trained, atol=1e-5)  # the extras matter
    assert torch.allclose(logits(load_extras(fresh, tmp_path / "adapter")), trained, atol=1e-5)


def test_qlora_trains_the_norms_of_its_quantized_model():
    plan = make_plan("tiny-llama", placement="all", allocation=4, norms=True)
    model = load_model(ModelSpec(name="tiny-llama", head="causal-lm"), seed=0)
    model = make_method(QLoraSpec()).apply(model, plan, [])
    train_extras(model, plan.extra)
    assert trainable_counts(model, [])["adapter"] == plan.trainable_params


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_a_method_that_chooses_its_own_parameters_refuses_bias_and_norm_modes(method):
    with pytest.raises(PeftlabError, match=f"method {method}"):
        validate(RunConfig, {"method": method, "plan": {"bias": "all"}}, "test")


def test_a_run_trains_and_saves_its_planned_biases(tmp_path, reviews_file, monkeypatch):
    from conftest import run_to_dict
    from safetensors.torch import load_file

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    config = validate(RunConfig, {"model": "tiny-bert", "task": {"path": str(reviews_file), "kind": "classification"},
                                  "plan": {"placement": "attention", "allocation": 4, "bias": "adapted", "norms": True},
                                  "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-2, "latency_batches": 0}}, "test")
    result = run_to_dict(config, tmp_path / "run")
    assert result["status"] == "done"
    assert result["cost"]["adapter_params"] == 8 * 4 * 128 + 512 + 640 == result["cost"]["plan_params"]
    saved = load_file(str(tmp_path / "run" / "adapter" / FILE))
    base = tiny_bert().state_dict()
    query_bias = "bert.encoder.layer.0.attention.self.query.bias"
    assert len(saved) == 8 + 10 and not torch.equal(saved[query_bias], base[query_bias])  # it trained
