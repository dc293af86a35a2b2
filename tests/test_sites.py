import pytest
from torch import nn
from transformers import PretrainedConfig

from peftlab.errors import PeftlabError
from peftlab.models.load import build_skeleton
from peftlab.models.roles import Role
from peftlab.models.sites import resolve_sites
from peftlab.specs import ModelSpec


def sites_of(name):
    return resolve_sites(build_skeleton(ModelSpec(name=name)))


def test_gpt2_fused_qkv_exposes_whole_module_and_three_slices():
    ms = sites_of("tiny-gpt2")
    layer0 = [s for s in ms.sites if s.layer == 0]
    by_role = {s.role: s for s in layer0}
    assert set(by_role) == {Role.QKV, Role.Q, Role.K, Role.V, Role.O, Role.UP, Role.DOWN}
    assert by_role[Role.QKV].path == by_role[Role.Q].path == "transformer.h.0.attn.c_attn"
    assert (by_role[Role.QKV].in_features, by_role[Role.QKV].out_features) == (64, 192)
    assert [by_role[r].out_slice for r in (Role.Q, Role.K, Role.V)] == [(0, 64), (64, 128), (128, 192)]
    # the two c_proj modules get different roles: resolved relative to the layer block, not by suffix
    assert by_role[Role.O].path == "transformer.h.0.attn.c_proj"
    assert by_role[Role.DOWN].path == "transformer.h.0.mlp.c_proj"
    assert (by_role[Role.DOWN].in_features, by_role[Role.DOWN].out_features) == (256, 64)
    assert by_role[Role.O].kind == "conv1d"


@pytest.mark.parametrize(
    "name, n_layers, roles",
    [
        ("tiny-bert", 2, {Role.Q, Role.K, Role.V, Role.O, Role.UP, Role.DOWN}),
        ("tiny-distilbert", 2, {Role.Q, Role.K, Role.V, Role.O, Role.UP, Role.DOWN}),
        ("tiny-llama", 4, {Role.Q, Role.K, Role.V, Role.O, Role.UP, Role.GATE, Role.DOWN}),
    ],
)
def test_every_layer_has_every_role_once(name, n_layers, roles):
    ms = sites_of(name)
    assert ms.n_layers == n_layers
    for layer in range(n_layers):
        assert sorted(s.role for s in ms.sites if s.layer == layer) == sorted(roles)


def test_bert_pooler_and_classifier_are_not_sites():
    paths = {s.path for s in sites_of("tiny-bert").sites}
    assert not any("pooler" in p or "classifier" in p for p in paths)
    assert "bert.encoder.layer.1.output.dense" in paths and "bert.encoder.layer.1.attention.output.dense" in paths


def test_llama_gqa_shapes_come_from_the_modules():
    k = next(s for s in sites_of("tiny-llama").sites if s.role is Role.K and s.layer == 0)
    assert (k.in_features, k.out_features) == (64, 32)  # 2 kv heads x 16


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()
        self.config.model_type = "mystery"
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"wq": nn.Linear(8, 8), "wo": nn.Linear(8, 8), "ff": nn.Linear(8, 16)}) for _ in range(3)
        )


def test_unknown_architecture_lists_linear_modules_and_shows_a_role_map():
    with pytest.raises(PeftlabError) as err:
        resolve_sites(Mystery())
    message = str(err.value)
    assert "unknown architecture 'mystery'" in message
    assert "blocks.{i}.wq (linear 8->8)" in message and "blocks.{i}.ff (linear 8->16)" in message
    assert "role_map" in message


def test_role_map_resolves_an_unknown_architecture():
    role_map = {r"blocks\.(?P<layer>\d+)\.wq": Role.Q, r"blocks\.\d+\.ff": Role.UP}
    ms = resolve_sites(Mystery(), role_map)
    assert ms.n_layers == 3
    assert [(s.layer, s.role) for s in ms.sites] == [(i, r) for i in range(3) for r in (Role.Q, Role.UP)]


def test_role_map_matching_nothing_is_an_error():
    with pytest.raises(PeftlabError, match="role_map matched no linear module"):
        resolve_sites(Mystery(), {r"nothing\.here": Role.Q})


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert", "tiny-distilbert", "tiny-llama", "tiny-phi3"])
def test_the_family_record_holds_what_the_model_needs(name):
    """Encoder or decoder, the head a sequence classifier adds, where the last layer can be cut: one record
    per family, and each of its module names exists in a model of the family."""
    from peftlab.models.architectures import family_for
    from peftlab.models.load import head_modules, is_encoder, load_model
    from peftlab.models.sites import layer_blocks
    from peftlab.specs import ModelSpec

    model = load_model(ModelSpec(name=name, head="sequence-classification", num_labels=2), seed=0)
    family = family_for(model.config.model_type)
    assert is_encoder(model.config.model_type) == family.encoder == (name in ("tiny-bert", "tiny-distilbert"))
    assert head_modules(model) == list(family.head_modules)  # every named head module exists
    blocks, _ = layer_blocks(model)
    if family.encoder:
        assert blocks[-1].get_submodule(family.sliced_from) is not None
    else:
        assert family.sliced_from is None
    from transformers.activations import ACT2FN

    assert family.activation(model.config) in ACT2FN  # the FFN's activation, named by the family's own field


def test_gemmas_activation_is_read_from_its_own_field():
    from transformers import Gemma3TextConfig

    from peftlab.models.architectures import family_for

    config = Gemma3TextConfig(hidden_activation="gelu_pytorch_tanh")
    assert family_for("gemma3_text").activation(config) == "gelu_pytorch_tanh"


def test_phi3_fused_projections_split_at_their_own_widths():
    """Grouped-query attention makes k and v narrower than q inside Phi-3's fused qkv_proj; gate_up_proj
    holds gate then up. Each part is a slice of its own width, and the whole modules have their own roles."""
    layer0 = {s.role: s for s in sites_of("tiny-phi3").sites if s.layer == 0}
    assert set(layer0) == {Role.QKV, Role.Q, Role.K, Role.V, Role.O, Role.GATE_UP, Role.GATE, Role.UP, Role.DOWN}
    # 4 heads and 2 key-value heads of width 16: q 64, k 32, v 32
    assert [layer0[r].out_slice for r in (Role.Q, Role.K, Role.V)] == [(0, 64), (64, 96), (96, 128)]
    assert layer0[Role.QKV].out_features == 128 and layer0[Role.K].out_features == 32
    assert [layer0[r].out_slice for r in (Role.GATE, Role.UP)] == [(0, 96), (96, 192)]
    assert layer0[Role.GATE_UP].path == layer0[Role.UP].path == "model.layers.0.mlp.gate_up_proj"
