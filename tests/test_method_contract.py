"""Every registered method keeps the same contract on every tiny architecture it supports.

Adding a method: one row in CONTRACT (the test fails until it has one).
"""

from dataclasses import dataclass, field

import pytest
import torch
from conftest import make_plan

from peftlab.methods.base import trainable_counts
from peftlab.methods.registry import METHODS, make_method
from peftlab.methods.specs import (
    PEFT_TYPES,
    AdaLoraSpec,
    BitFitSpec,
    BottleneckSpec,
    FullSpec,
    HiraSpec,
    LoraSpec,
    PeftTypeSpec,
    PrefixSpec,
    QLoraSpec,
    SparseLoraSpec,
)
from peftlab.models.load import build_skeleton, head_modules, load_model
from peftlab.plans.peft_export import wrapped_modules
from peftlab.specs import ModelSpec
from peftlab.train.loss import batch_nll

ARCHS = {"tiny-gpt2": "causal-lm", "tiny-bert": "sequence-classification",
         "tiny-distilbert": "sequence-classification", "tiny-llama": "causal-lm"}
STEPS = 20
LINEAR_ONLY = ("tiny-bert", "tiny-distilbert", "tiny-llama")


@dataclass(frozen=True)
class Row:
    spec: object
    archs: tuple[str, ...] = tuple(ARCHS)
    lr: float = 1e-2
    plan_exact: bool = True  # a rank method whose trainable count is its planned sites' (AdaLoRA starts above)
    quantizes: bool = False  # its base is the 4-bit model: compared with its adapters disabled
    perturbation: float = 0.05  # the scale of the trained-looking values `perturbed` adds
    placement: dict = field(default_factory=lambda: {"roles": "all", "layers": "upper-half"})


CONTRACT = {
    "lora": Row(LoraSpec(use_dora=True)),  # DoRA: the planned count has a magnitude per output channel too
    "qlora": Row(QLoraSpec(), archs=("tiny-llama", "tiny-bert"), quantizes=True),
    "sparselora": Row(SparseLoraSpec(profile="uniform", ffn_sparsity=0.5, attention_sparsity=0.5)),
    "adalora": Row(AdaLoraSpec(), plan_exact=False),
    "hira": Row(HiraSpec(), lr=1e-1, perturbation=1.0),  # the update is scaled by the (small) base weights
    "bottleneck": Row(BottleneckSpec()),
    "prefix": Row(PrefixSpec(num_virtual_tokens=4), archs=("tiny-gpt2", "tiny-llama"), lr=1e-1),
    "bitfit": Row(BitFitSpec(), archs=("tiny-gpt2", "tiny-bert", "tiny-distilbert")),  # LLaMA has no biases
    "full": Row(FullSpec(), lr=1e-3),
    # PEFT's other methods on the plan (`method: {name: peft, type: ...}`); PEFT adapts no Conv1D with LoHa,
    # LoKr, OFT or BOFT, so those rows leave GPT-2 out
    "peft:LOHA": Row(PeftTypeSpec(type="LOHA"), archs=LINEAR_ONLY),
    "peft:LOKR": Row(PeftTypeSpec(type="LOKR"), archs=LINEAR_ONLY),
    "peft:IA3": Row(PeftTypeSpec(type="IA3"), lr=1e-1),  # scales of 1 around the base: small steps move little
    "peft:VERA": Row(PeftTypeSpec(type="VERA"), lr=1e-1),
    "peft:OFT": Row(PeftTypeSpec(type="OFT", options={"oft_block_size": 8}), archs=LINEAR_ONLY),
    "peft:BOFT": Row(PeftTypeSpec(type="BOFT"), archs=LINEAR_ONLY),
    "peft:FOURIERFT": Row(PeftTypeSpec(type="FOURIERFT", options={"n_frequency": 64, "scaling": 10.0}), lr=1e-1),
}
CASES = [(name, arch) for name, row in CONTRACT.items() for arch in row.archs]
# Variants that train differently from their method's row (the other checks do not depend on them)
VARIANTS = {"lora": Row(LoraSpec()), "lora+": Row(LoraSpec(loraplus=True), lr=1e-3)}  # LoRA+: B learns 16x faster


def test_every_registered_method_has_a_contract_row():
    assert set(CONTRACT) == set(METHODS) - {"peft"} | {f"peft:{t}" for t in PEFT_TYPES}


def base(arch):
    return load_model(ModelSpec(name=arch, head=ARCHS[arch]), seed=0)


def batch(arch):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, 2000, (2, 12), generator=g)
    labels = torch.tensor([0, 1]) if ARCHS[arch] == "sequence-classification" else ids.clone()
    if ARCHS[arch] == "causal-lm":
        labels[:, :6] = -100  # a prompt the loss does not read (SparseLoRA runs it sparse)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def kind(arch):
    return "classification" if ARCHS[arch] == "sequence-classification" else "instruction"


def loss(model, method, arch):
    nll, count, _ = batch_nll(model, batch(arch), kind(arch), method.hidden_states)
    return nll / count


def applied(name, arch, row=None):
    row = row or CONTRACT[name]
    torch.manual_seed(0)  # initializations that draw from the global generator do not depend on test order
    model = base(arch)
    method = make_method(row.spec, total_steps=STEPS)
    plan = make_plan(arch, placement=row.placement, allocation=4)
    return method, method.apply(model, plan, head_modules(model)), plan


def perturbed(model, name):
    """Trained-looking values in every trainable parameter, so that the checks below compare outputs that
    differ from the base model's."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(CONTRACT[name].perturbation * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("name, arch", CASES)
def test_the_initial_model_is_the_base(name, arch):
    method, model, _ = applied(name, arch)
    model.eval()
    with torch.no_grad():
        if CONTRACT[name].quantizes:
            with model.disable_adapter():
                expected = loss(model, method, arch)
        else:
            expected = loss(base(arch).eval(), method, arch) if method.bypassed(model) is None else None
        if expected is None:  # prefixes change the output from the start: bypassed, the model is the base
            with method.bypassed(model):
                expected = loss(model, method, arch)
            reference = loss(base(arch).eval(), make_method(LoraSpec()), arch)
            assert torch.allclose(expected, reference, atol=1e-5)
        else:
            assert torch.allclose(loss(model, method, arch), expected, atol=1e-5)


@pytest.mark.parametrize("name, arch", CASES)
def test_the_meta_device_count_is_the_real_count_and_the_plan_predicts_it(name, arch):
    method, model, plan = applied(name, arch)
    heads = head_modules(model)
    real = trainable_counts(model, heads)["adapter"]
    skeleton = build_skeleton(ModelSpec(name=arch, head=ARCHS[arch]))
    assert make_method(CONTRACT[name].spec, total_steps=STEPS).trainable_for(skeleton, plan, heads) == real
    if method.counted_per_site and CONTRACT[name].plan_exact:
        assert sum(method.site_params(p.site, p.rank) for p in plan.sites) == real


@pytest.mark.parametrize("name, arch", [c for c in CASES if c[0].startswith("peft:")])
def test_a_peft_type_wraps_the_planned_modules_alone(name, arch):
    method, model, plan = applied(name, arch)
    wrapped = wrapped_modules(model, layer_class=method.type.layer_class(), size=None, alpha=None)
    assert set(wrapped) == {p.site.path for p in plan.sites}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = head_modules(model)
    outside = [n for n in trainable if not any(path in n for path in wrapped) and not any(h in n.split(".") for h in heads)]
    assert not outside


@pytest.mark.parametrize("name, arch", CASES)
def test_save_then_load_gives_the_same_outputs(name, arch, tmp_path):
    method, model, plan = applied(name, arch)
    perturbed(model, name)
    model.eval()
    with torch.no_grad():
        trained = loss(model, method, arch)
    method.save(model, tmp_path / "adapter")
    fresh_method, fresh, _ = applied(name, arch)
    fresh = fresh_method.load(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(loss(fresh, fresh_method, arch), trained, atol=1e-5)


@pytest.mark.parametrize("name, arch", [c for c in CASES if make_method(CONTRACT[c[0]].spec).mergeable])
def test_merged_equals_unmerged(name, arch):
    method, model, _ = applied(name, arch)
    perturbed(model, name)
    model.eval()
    with torch.no_grad():
        unmerged = loss(model, method, arch)
        assert not torch.allclose(unmerged, loss(base(arch).eval(), method, arch), atol=1e-6)
        with method.merged(model) as merged:
            assert torch.allclose(loss(merged, method, arch), unmerged, atol=1e-3 if name == "qlora" else 1e-5)


@pytest.mark.parametrize("name, arch, variant", [(n, a, None) for n, a in CASES] +
                         [("lora", arch, v) for v in VARIANTS for arch in ARCHS])
def test_the_loss_falls_when_the_applied_instance_trains(name, arch, variant):
    torch.manual_seed(0)
    row = VARIANTS[variant] if variant else CONTRACT[name]
    method, model, _ = applied(name, arch, row)
    optimizer = torch.optim.AdamW(method.param_groups(model, row.lr, 0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    losses = []
    for step in range(1, STEPS + 1):
        data = batch(arch)
        method.prepare_batch(data)  # the loop's hooks, as in a run
        nll, count, _ = batch_nll(model, data, kind(arch), method.hidden_states)
        penalty = method.regularization(model)
        value = nll / count if penalty is None else nll / count + penalty
        value.backward()
        optimizer.step()
        method.on_step(model, step, STEPS)
        optimizer.zero_grad()
        losses.append((nll / count).item())
    assert losses[-1] < (losses[0] - 0.1 if kind(arch) == "instruction" else 0.9 * losses[0]), losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    if name == "sparselora":  # the frozen projections really ran sparse after the dense warm-up step
        assert method.report(model)["flops"]["executed_share"] < 0.9
