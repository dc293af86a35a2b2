"""The method table: LoRA, full fine-tuning and BitFit on tiny models of every family."""

import pytest
import torch
from conftest import make_plan

from peftlab.methods.base import trainable_counts
from peftlab.methods.registry import make_method
from peftlab.methods.specs import BitFitSpec, FullSpec, HiraSpec, LoraSpec, SparseLoraSpec
from peftlab.models.load import count_params, head_modules, load_model, unwrap
from peftlab.models.roles import Role
from peftlab.specs import ModelSpec

ARCHS = [("tiny-gpt2", "causal-lm"), ("tiny-bert", "sequence-classification"),
         ("tiny-distilbert", "sequence-classification"), ("tiny-llama", "causal-lm")]
# Adapter methods on the plan: (name, spec, extra trainable parameters per site beyond r x (in + out)).
ADAPTERS = [
    ("lora", LoraSpec(), lambda site: 0),
    ("dora", LoraSpec(use_dora=True), lambda site: site.out_features),  # one magnitude per output channel
    ("rslora", LoraSpec(use_rslora=True), lambda site: 0),
    ("hira", HiraSpec(), lambda site: 0),
    ("sparselora", SparseLoraSpec(profile="uniform"), lambda site: 0),  # sparsity adds no parameters
]
TABLE = [(a, m) for a in ARCHS for m in ADAPTERS]
IDS = [f"{a[0]}-{m[0]}" for a, m in TABLE]


def tiny(name, head):
    return load_model(ModelSpec(name=name, head=head), seed=0)


def inputs():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(200, 2000, (2, 12), generator=g), "attention_mask": torch.ones(2, 12, dtype=torch.long)}


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(**inputs()).logits


@pytest.mark.parametrize("arch, adapter", TABLE, ids=IDS)
def test_zero_initialised_adapter_reproduces_the_base(arch, adapter):
    (name, head), (_, spec, _) = arch, adapter
    base = tiny(name, head)
    expected = logits(base)
    plan = make_plan(name, placement="all", allocation=4)
    model = make_method(spec).apply(tiny(name, head), plan, head_modules(base))
    assert torch.allclose(logits(model), expected, atol=1e-5)


@pytest.mark.parametrize("arch, adapter", TABLE, ids=IDS)
def test_merged_equals_unmerged(arch, adapter):
    (name, head), (_, spec, _) = arch, adapter
    plan = make_plan(name, placement="all", allocation="linear(4->2)")
    method = make_method(spec)
    model = method.apply(tiny(name, head), plan, [])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "hira_B" in n:
                p.normal_(0, 2.0 if "hira" in n else 0.05)  # a trained-looking update (HiRA scales by W0)
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(tiny(name, head)), atol=1e-6)
    method.merge(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    method.unmerge(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)


@pytest.mark.parametrize("arch, adapter", TABLE, ids=IDS)
def test_adapter_trains_only_planned_sites_and_the_head(arch, adapter):
    (name, head), (_, spec, extra) = arch, adapter
    plan = make_plan(name, placement={"roles": "attention", "layers": "upper-half"}, allocation=4)
    base = tiny(name, head)
    heads = head_modules(base)
    model = make_method(spec).apply(base, plan, heads)
    planned = {p.site.path for p in plan.sites}
    for n, p in model.named_parameters():
        if p.requires_grad and ("lora_" in n or "hira_" in n):
            path = n.removeprefix("base_model.model.").split(".lora_")[0].split(".hira_")[0]
            assert path in planned, n
        elif p.requires_grad:
            assert any(h in n.split(".") for h in heads), n
    counts = trainable_counts(model, heads)
    assert counts["adapter"] == plan.trainable_params + sum(extra(p.site) for p in plan.sites)
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


def test_loraplus_gives_b_matrices_a_larger_learning_rate():
    plan = make_plan("tiny-llama", placement="o", allocation=4)
    method = make_method(LoraSpec(loraplus=True, loraplus_lr_ratio=16))
    model = method.apply(tiny("tiny-llama", "causal-lm"), plan, [])
    names = {id(p): n for n, p in model.named_parameters()}
    groups = method.param_groups(model, lr=1e-3, weight_decay=0.0)
    assert sorted(g["lr"] for g in groups) == [1e-3, 16e-3]
    assert all("lora_B" in names[id(p)] for g in groups if g["lr"] == 16e-3 for p in g["params"])
    assert all("lora_A" in names[id(p)] for g in groups if g["lr"] == 1e-3 for p in g["params"])


def test_q_and_v_slices_of_gpt2_c_attn():
    from peftlab.methods.fused_slices import slice_modules

    plan = make_plan("tiny-gpt2", placement="q,v", allocation=4)
    method = make_method(LoraSpec())
    model = method.apply(tiny("tiny-gpt2", "causal-lm"), plan, [])
    assert logits(model).equal(logits(tiny("tiny-gpt2", "causal-lm")))  # B = 0
    assert trainable_counts(model, [])["adapter"] == plan.trainable_params == 2 * 2 * 4 * (64 + 64)
    attn = slice_modules(model)["transformer.h.0.attn.c_attn"]
    with torch.no_grad():
        for b in attn.lora_B:
            b.normal_(0, 0.5)
    x = torch.randn(2, 5, 64)
    out, base_out = attn(x), attn.base(x)
    assert out[..., 64:128].equal(base_out[..., 64:128])  # k is never written
    assert not torch.allclose(out[..., :64], base_out[..., :64]) and not torch.allclose(out[..., 128:], base_out[..., 128:])
    unmerged = logits(model)
    method.merge(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    method.unmerge(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)


def test_slices_and_whole_modules_together_save_and_load(tmp_path):
    plan = make_plan("tiny-gpt2", placement="q,v,o,up", allocation=4)
    method = make_method(LoraSpec())
    model = method.apply(tiny("tiny-gpt2", "causal-lm"), plan, [])
    assert trainable_counts(model, [])["adapter"] == plan.trainable_params
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    expected = logits(model)
    method.save(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and (tmp_path / "adapter" / "fused_slices.json").is_file()
    # a fresh base with the same plan, then the saved weights: the same outputs
    fresh_method = make_method(LoraSpec())
    fresh = fresh_method.load(fresh_method.apply(tiny("tiny-gpt2", "causal-lm"), plan, []), tmp_path / "adapter")
    assert torch.allclose(logits(fresh), expected, atol=1e-6)


def test_dora_on_slices_is_a_clear_error():
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="not available for slices"):
        make_method(LoraSpec(use_dora=True)).apply(tiny("tiny-gpt2", "causal-lm"), make_plan("tiny-gpt2", placement="q,v"), [])


BOTTLENECK = [("houlsby", (Role.O, Role.DOWN)), ("pfeiffer", (Role.DOWN,))]


@pytest.mark.parametrize("name, head", ARCHS)
@pytest.mark.parametrize("variant, roles", BOTTLENECK)
def test_bottleneck_adapters(name, head, variant, roles, tmp_path):
    from peftlab.methods.specs import BottleneckSpec

    base = tiny(name, head)
    expected = logits(base)
    heads = head_modules(base)
    plan = make_plan(name, placement={"roles": "all", "layers": "upper-half"}, allocation=4)
    method = make_method(BottleneckSpec(variant=variant))
    model = method.apply(tiny(name, head), plan, heads)
    assert torch.allclose(logits(model), expected, atol=1e-6)  # up = 0: starts at the base
    sites = [p for p in plan.sites if p.site.role in roles]
    per_site = [2 * p.site.out_features * p.rank + p.rank + p.site.out_features for p in sites]
    counts = trainable_counts(model, heads)
    assert counts["adapter"] == sum(per_site) and len(sites) == len(roles) * len({p.site.layer for p in plan.sites})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".up." in n:
                p.normal_(0, 0.1)
    trained = logits(model)
    assert not torch.allclose(trained, expected, atol=1e-6)
    with method.bypassed(model):
        assert torch.allclose(logits(model), expected, atol=1e-6)
    method.save(model, tmp_path / "adapter")
    fresh_method = make_method(BottleneckSpec(variant=variant))
    fresh = fresh_method.load(fresh_method.apply(tiny(name, head), plan, heads), tmp_path / "adapter")
    assert torch.allclose(logits(fresh), trained, atol=1e-6)


def test_bottleneck_needs_its_roles_in_the_plan():
    from peftlab.errors import PeftlabError
    from peftlab.methods.specs import BottleneckSpec

    with pytest.raises(PeftlabError, match="the plan has no ffn.down site"):
        make_method(BottleneckSpec(variant="pfeiffer")).apply(tiny("tiny-bert", "sequence-classification"),
                                                              make_plan("tiny-bert", placement="attention"), [])


def test_lora_on_unequal_slices_of_phi3_writes_only_their_outputs():
    from peftlab.methods.fused_slices import slice_modules

    plan = make_plan("tiny-phi3", placement="k,gate", allocation=4)
    method = make_method(LoraSpec())
    model = method.apply(tiny("tiny-phi3", "causal-lm"), plan, [])
    assert logits(model).equal(logits(tiny("tiny-phi3", "causal-lm")))  # B = 0
    assert trainable_counts(model, [])["adapter"] == plan.trainable_params
    modules = slice_modules(model)
    qkv, gate_up = modules["model.layers.0.self_attn.qkv_proj"], modules["model.layers.0.mlp.gate_up_proj"]
    with torch.no_grad():
        for b in [*qkv.lora_B, *gate_up.lora_B]:
            b.normal_(0, 0.5)
    x = torch.randn(2, 5, 64)
    out, base_out = qkv(x), qkv.base(x)
    assert out[..., :64].equal(base_out[..., :64]) and out[..., 96:].equal(base_out[..., 96:])  # q and v untouched
    assert not torch.allclose(out[..., 64:96], base_out[..., 64:96])  # k, 32 wide
    out, base_out = gate_up(x), gate_up.base(x)
    assert out[..., 96:].equal(base_out[..., 96:]) and not torch.allclose(out[..., :96], base_out[..., :96])
    unmerged = logits(model)
    method.merge(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)


def test_the_head_is_read_from_transformers_registries_also_for_a_model_with_its_own_code():
    from transformers import LlamaForSequenceClassification

    from peftlab.methods.lora import peft_task_type
    from peftlab.models.load import head_kind, head_modules

    classifier = tiny("tiny-llama", "sequence-classification")
    assert (head_kind(classifier), peft_task_type(classifier), head_modules(classifier)) == \
        ("sequence-classification", "SEQ_CLS", ["score"])
    assert peft_task_type(tiny("tiny-gpt2", "causal-lm")) == "CAUSAL_LM"

    class MyClassifier(LlamaForSequenceClassification):  # a model's own code (trust_remote_code)
        pass

    own = MyClassifier(classifier.config)
    assert head_kind(own) is None and head_modules(own) == []  # unregistered: no head is guessed from its name
    own.config.auto_map = {"AutoModelForSequenceClassification": "modeling_mine.MyClassifier"}
    assert head_kind(own) == "sequence-classification" and head_modules(own) == ["score"]


def test_every_part_of_a_fused_projection_gets_its_own_update_with_fused_parts(tmp_path):
    """placement.fused: parts (the LoRA paper's MergedLinear): q, k and v of GPT-2's c_attn each get their own A and
    B at the plan's rank, are counted as such, save, reload and merge to the same outputs."""
    from peftlab.methods.fused_slices import slice_modules

    plan = make_plan("tiny-gpt2", placement={"roles": "q,k,v,o", "fused": "parts"}, allocation=4)
    whole = make_plan("tiny-gpt2", placement={"roles": "q,k,v,o"}, allocation=4)
    assert {(p.site.role.short, p.site.out_slice) for p in plan.sites if p.site.layer == 0} == {
        ("q", (0, 64)), ("k", (64, 128)), ("v", (128, 192)), ("o", None)}
    per_layer = 3 * 4 * (64 + 64) + 4 * (64 + 64)
    assert plan.trainable_params == 2 * per_layer and whole.trainable_params == 2 * (4 * (64 + 192) + 4 * (64 + 64))
    method = make_method(LoraSpec())
    model = method.apply(tiny("tiny-gpt2", "causal-lm"), plan, [])
    assert trainable_counts(model, [])["adapter"] == plan.trainable_params
    attn = slice_modules(model)["transformer.h.1.attn.c_attn"]
    assert [a.shape for a in attn.lora_A] == [torch.Size([4, 64])] * 3 and attn.slices == [(0, 64), (64, 128), (128, 192)]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    trained = logits(model)
    assert not torch.allclose(trained, logits(tiny("tiny-gpt2", "causal-lm")), atol=1e-4)
    method.save(model, tmp_path / "adapter")
    fresh_method = make_method(LoraSpec())
    fresh = fresh_method.load(fresh_method.apply(tiny("tiny-gpt2", "causal-lm"), plan, []), tmp_path / "adapter")
    assert torch.allclose(logits(fresh), trained, atol=1e-6)
    fresh_method.merge(fresh)
    assert torch.allclose(logits(fresh), trained, atol=1e-5)


def test_fused_parts_on_a_method_peft_runs_is_one_line():
    from peftlab.errors import PeftlabError
    from peftlab.methods.specs import HiraSpec

    plan = make_plan("tiny-gpt2", placement={"roles": "attention", "fused": "parts"}, allocation=4)
    with pytest.raises(PeftlabError, match="select all its parts with placement.fused: whole"):
        make_method(HiraSpec()).apply(tiny("tiny-gpt2", "causal-lm"), plan, [])
