"""The architecture catalog builds on the meta device and matches the published parameter counts."""

import pytest
import torch

from peftlab.errors import PeftlabError
from peftlab.models.load import (
    build_skeleton,
    catalog,
    count_params,
    load_config,
    load_model,
    load_tokenizer,
)
from peftlab.specs import ModelSpec

# Parameter counts as published with the weights: encoders without a task head, decoders with their
# LM head (tied to the embeddings in GPT-2, Qwen2.5, Gemma 3 and Llama 3.2, untied in LLaMA 2/3 and Mistral).
ENCODERS = {"bert-base", "roberta-base", "distilbert-base", "minilm-l6"}
KNOWN = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "dialogpt-medium": 354_823_168,
    "bert-base": 109_482_240,
    "roberta-base": 124_645_632,
    "distilbert-base": 66_362_880,
    "minilm-l6": 22_713_216,
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "llama-3.2-3b": 3_212_749_824,  # PEFT's method comparison records the same
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "gemma-3-270m": 268_098_176,
}


def test_every_catalog_entry_has_a_known_count():
    assert set(catalog()) == set(KNOWN)


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_catalog_parameter_counts(name):
    model = build_skeleton(ModelSpec(name=name, head="base" if name in ENCODERS else "causal-lm"))
    assert next(model.parameters()).device.type == "meta"
    assert count_params(model) == KNOWN[name]


def test_minilm_preset_config_comes_from_the_package():
    config = load_config(ModelSpec(name="minilm-l6"))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    assert config.num_labels == 2


def test_local_config_json_directory(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 4,'
        ' "intermediate_size": 48, "vocab_size": 100}'
    )
    model = build_skeleton(ModelSpec(name=str(tmp_path)))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 3


def test_local_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(PeftlabError, match="has no config.json"):
        load_config(ModelSpec(name=str(tmp_path)))


def test_unknown_model_names_the_closest_ones_offline():
    with pytest.raises(PeftlabError, match=r"unknown model 'llama3-8b' .*offline.*did you mean llama-3-8b"):
        load_config(ModelSpec(name="llama3-8b"))
    with pytest.raises(PeftlabError, match=r"unknown model 'no-such/model-xyz' .*`peftlab models` lists them") as err:
        load_config(ModelSpec(name="no-such/model-xyz"))
    assert "did you mean" not in str(err.value)
    with pytest.raises(PeftlabError, match="not a preset"):
        load_config(ModelSpec(name="not a model!"))


def test_config_json_file_is_a_randomly_initialised_model(tmp_path):
    """A config file has no weights: the model is initialised from the seed and uses the bundled tokenizer."""
    path = tmp_path / "scaled.json"
    path.write_text('{"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,'
                    ' "intermediate_size": 48, "vocab_size": 30522}')
    spec = ModelSpec(name=str(path))
    first, again, other = (load_model(spec, seed=s) for s in (0, 0, 1))
    weight = "model.layers.0.mlp.up_proj.weight"
    assert first.state_dict()[weight].shape == (48, 32)
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])
    assert len(load_tokenizer(spec)) <= 30522
    path.write_text('{"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,'
                    ' "intermediate_size": 48, "vocab_size": 100}')
    with pytest.raises(PeftlabError, match="vocab_size must be at least 30522"):
        load_tokenizer(ModelSpec(name=str(path)))
