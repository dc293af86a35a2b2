"""The method table: LoRA, full fine-tuning and BitFit on tiny models of every family."""

import pytest
import torch

from peftlab.config import ModelSpec
from peftlab.methods.base import trainable_counts
from peftlab.methods.bitfit import BitFitSpec
from peftlab.methods.full import FullSpec
from peftlab.methods.lora import LoraSpec
from peftlab.methods.registry import make_method
from peftlab.models.load import count_params, head_modules, load_model
from peftlab.train.loss import unwrap

from conftest import make_plan

ARCHS = [("tiny-gpt2", "causal-lm"), ("tiny-bert", "sequence-classification"),
         ("tiny-distilbert", "sequence-classification"), ("tiny-llama", "causal-lm")]


def tiny(name, head):
    return load_model(ModelSpec(name=name, head=head), seed=0)


def inputs():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(200, 2000, (2, 12), generator=g), "attention_mask": torch.ones(2, 12, dtype=torch.long)}


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(**inputs()).logits


@pytest.mark.parametrize("name, head", ARCHS)
def test_zero_initialised_lora_reproduces_the_base(name, head):
    base = tiny(name, head)
    expected = logits(base)
    plan = make_plan(name, placement="all", allocation=4)
    model = make_method(LoraSpec()).apply(tiny(name, head), plan, head_modules(base))
    assert torch.allclose(logits(model), expected, atol=1e-6)


@pytest.mark.parametrize("name, head", ARCHS)
def test_merged_equals_unmerged(name, head):
    plan = make_plan(name, placement="all", allocation="linear(4->2)")
    method = make_method(LoraSpec())
    model = method.apply(tiny(name, head), plan, [])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained-looking update, so merging changes the weights
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(tiny(name, head)), atol=1e-4)
    method.merge(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    method.unmerge(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)


@pytest.mark.parametrize("name, head", ARCHS)
def test_lora_trains_only_planned_sites_and_the_head(name, head):
    plan = make_plan(name, placement={"roles": "attention", "layers": "upper-half"}, allocation=4)
    base = tiny(name, head)
    heads = head_modules(base)
    model = make_method(LoraSpec()).apply(base, plan, heads)
    planned = {p.site.path for p in plan.sites}
    for n, p in model.named_parameters():
        if p.requires_grad and "lora_" in n:
            path = n.removeprefix("base_model.model.").split(".lora_")[0]
            assert path in planned, n
        elif p.requires_grad:
            assert any(h in n.split(".") for h in heads), n
    counts = trainable_counts(model, heads)
    assert counts["adapter"] == plan.trainable_params
    expected_head = sum(p.numel() for h in heads for p in tiny(name, head).get_submodule(h).parameters())
    assert counts["head"] == expected_head


def test_bitfit_trains_biases_and_head_only():
    plan = make_plan("tiny-bert", placement="all", allocation=4)
    base = tiny("tiny-bert", "sequence-classification")
    model = make_method(BitFitSpec()).apply(base, plan, ["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in trainable)
    assert "classifier.weight" in trainable and "bert.encoder.layer.0.intermediate.dense.bias" in trainable
    scoped = make_method(BitFitSpec(scope="plan")).apply(tiny("tiny-bert", "sequence-classification"),
                                                          make_plan("tiny-bert", placement="o"), ["classifier"])
    biases = {n for n, p in scoped.named_parameters() if p.requires_grad and not n.startswith("classifier")}
    assert biases == {f"bert.encoder.layer.{i}.attention.output.dense.bias" for i in range(2)}


def test_bitfit_without_biases_is_a_clear_error():
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="no bias terms"):
        make_method(BitFitSpec()).apply(tiny("tiny-llama", "causal-lm"), make_plan("tiny-llama"), [])


def test_full_trains_everything():
    model = make_method(FullSpec()).apply(tiny("tiny-gpt2", "causal-lm"), make_plan("tiny-gpt2"), [])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count_params(model)


def test_unwrap_finds_the_transformers_model():
    model = make_method(LoraSpec()).apply(tiny("tiny-llama", "causal-lm"), make_plan("tiny-llama"), [])
    assert type(unwrap(model)).__name__ == "LlamaForCausalLM"
