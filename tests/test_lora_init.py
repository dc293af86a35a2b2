"""LoRA's initializations through PEFT (`method.init`): each starts from the base model's outputs, does what it
says to A, B and the base weights, and round-trips; LoftQ needs a CUDA device and says so."""

import pytest
import torch
from conftest import make_plan

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.methods.base import trainable_counts
from peftlab.methods.registry import make_method
from peftlab.methods.specs import LoraSpec
from peftlab.models.load import build_skeleton, head_modules, load_model
from peftlab.specs import ModelSpec, RunConfig
from peftlab.studies.grid import learned_config

ARCHS = {"tiny-llama": "causal-lm", "tiny-bert": "sequence-classification"}
INITS = ["gaussian", "pissa", "olora", "eva"]


def inputs(arch, seed=0, batch=4):
    ids = torch.randint(200, 2000, (batch, 12), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone() if ARCHS[arch] == "causal-lm" else torch.arange(batch) % 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def applied(arch, init):
    torch.manual_seed(0)
    model = load_model(ModelSpec(name=arch, head=ARCHS[arch]), seed=0)
    method = make_method(LoraSpec(init=init))
    plan = make_plan(arch, placement="all", allocation=4)
    model = method.apply(model, plan, head_modules(model))
    method.initialize(model, [inputs(arch, seed) for seed in range(4)])
    return method, model.eval(), plan


def logits(model, arch):
    batch = inputs(arch, seed=9)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", INITS)
def test_every_init_starts_from_the_base_outputs_with_the_planned_count(arch, init):
    method, model, plan = applied(arch, init)
    base = load_model(ModelSpec(name=arch, head=ARCHS[arch]), seed=0).eval()
    assert torch.allclose(logits(model, arch), logits(base, arch), atol=1e-4)
    heads = head_modules(model)
    skeleton = build_skeleton(ModelSpec(name=arch, head=ARCHS[arch]))
    assert trainable_counts(model, heads)["adapter"] == method.trainable_for(skeleton, plan, heads) == \
        sum(method.site_params(p.site, p.rank) for p in plan.sites)


def test_pissa_moves_the_principal_part_of_each_weight_into_a_and_b():
    _, model, _ = applied("tiny-llama", "pissa")
    base = load_model(ModelSpec(name="tiny-llama", head="causal-lm"), seed=0)
    for path, layer in lora_layers(model).items():
        original = base.get_submodule(path).weight
        residual = layer.base_layer.weight
        update = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        assert torch.allclose(residual + update, original, atol=1e-5)
        # the update is the best rank-4 approximation: its norm is that of the top 4 singular values
        top = torch.linalg.svdvals(original)[:4]
        assert torch.allclose(torch.linalg.matrix_norm(update), top.norm(), rtol=1e-4)


def test_eva_takes_a_from_the_inputs_principal_directions():
    _, model, _ = applied("tiny-llama", "eva")
    _, default, _ = applied("tiny-llama", "default")
    for path, layer in lora_layers(model).items():
        a = layer.lora_A["default"].weight  # (r, in): right singular vectors of the site's inputs
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-4), path
        assert not torch.allclose(a, lora_layers(default)[path].lora_A["default"].weight)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


@pytest.mark.parametrize("init", ["pissa", "eva"])
def test_save_then_load_gives_the_same_outputs(init, tmp_path):
    method, model, _ = applied("tiny-llama", init)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained = logits(model, "tiny-llama")
    method.save(model, tmp_path / "adapter")
    fresh_method, fresh, _ = applied("tiny-llama", init)  # PiSSA's residual base is rebuilt the same way
    fresh_method.load(fresh, tmp_path / "adapter")
    assert torch.allclose(logits(fresh, "tiny-llama"), trained, atol=1e-5)


def test_loftq_needs_a_cuda_device_and_other_methods_keep_the_default_init(tmp_path, cli):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"instruction": "say {w}", "output": "{w}"}}\n' for w in ["red", "blue"] * 10))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: tiny-llama\ntask: {{path: {data}, kind: instruction}}\nmethod: {{name: lora, init: loftq}}\n")
    code, out, err = cli("run", "-c", config, "--device", "cpu", "--output", tmp_path / "run")
    assert code == 2 and "method lora init loftq cannot run on cpu: PEFT's LoftQ" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(PeftlabError, match="init pissa is available with method lora only"):
        validate(RunConfig, {"model": "tiny-llama", "task": {"path": "d.jsonl", "kind": "instruction"},
                             "method": {"name": "qlora", "init": "pissa"}}, "test")


def test_the_default_init_stays_out_of_run_ids():
    config = validate(RunConfig, {"model": "tiny-llama", "task": {"path": "d.jsonl", "kind": "instruction"}}, "t")
    dumped = config.model_dump(mode="json", by_alias=True)
    assert "init" not in learned_config(dumped)["method"]
    pissa = {**dumped, "method": {**dumped["method"], "init": "pissa"}}
    assert learned_config(pissa)["method"]["init"] == "pissa"
