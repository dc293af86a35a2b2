"""Gradient checkpointing (`train.gradient_checkpointing`) recomputes activations and changes nothing learned:
the same gradients (dropout on: non-reentrant checkpointing replays its masks) and the same run."""

import pytest
import torch
from conftest import make_plan, run_to_dict

from peftlab.config import validate
from peftlab.methods.registry import make_method
from peftlab.methods.specs import LoraSpec
from peftlab.models.load import head_modules, load_model
from peftlab.models.sites import layer_blocks
from peftlab.specs import ModelSpec, RunConfig
from peftlab.train.speed.checkpointing import GradientCheckpointing


def adapter_gradients(name: str, head: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """The trainable parameters' gradients after one step, and how many times a module inside layer 0 ran forward
    (transformers checkpoints a layer's `forward`, so hooks on the layer itself run once either way)."""
    torch.manual_seed(0)  # LoRA's A matrices
    model = load_model(ModelSpec(name=name, head=head, dropout=0.1), seed=0)
    model = make_method(LoraSpec(), 10).apply(model, make_plan(name, placement="all", allocation=4),
                                              head_modules(model))
    with torch.no_grad():  # B away from zero, so that every adapter matrix gets a gradient
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(parameter_name)))
    if checkpointing:
        assert GradientCheckpointing().install(model, None, None) == {"used": True}
    calls = []
    next(layer_blocks(model)[0][0].children()).register_forward_hook(lambda *args: calls.append(1))
    model.train()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(200, 2000, (2, 12), generator=g)
    labels = input_ids if head == "causal-lm" else torch.tensor([0, 1])
    torch.manual_seed(1)  # the dropout masks
    model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}, len(calls)


@pytest.mark.parametrize("name, head", [("tiny-llama", "causal-lm"), ("tiny-gpt2", "causal-lm"),
                                        ("tiny-bert", "sequence-classification")])
def test_checkpointing_gives_the_same_gradients(name, head):
    (plain, plain_calls), (checkpointed, checkpointed_calls) = (adapter_gradients(name, head, False),
                                                                adapter_gradients(name, head, True))
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the backward pass recomputed the layer's inside
    assert plain.keys() == checkpointed.keys() and any("lora_A" in n for n in plain)
    for parameter_name, gradient in plain.items():
        assert gradient.abs().sum() > 0, parameter_name
        torch.testing.assert_close(checkpointed[parameter_name], gradient, rtol=1e-5, atol=1e-7)


def test_a_run_with_checkpointing_learns_what_it_learns_without(tmp_path, reviews_file):
    def config(checkpointing: bool):
        return validate(RunConfig, {
            "model": {"name": "tiny-bert", "dropout": 0.1},
            "task": {"path": str(reviews_file), "kind": "classification"},
            "plan": {"placement": "all", "allocation": 4},
            "train": {"max_steps": 4, "batch_size": 8, "lr": 5e-3, "latency_batches": 0,
                      "gradient_checkpointing": checkpointing}}, "test")

    plain = run_to_dict(config(False), tmp_path / "plain")
    checkpointed = run_to_dict(config(True), tmp_path / "checkpointed")
    assert checkpointed["speed"]["gradient_checkpointing"] == {"used": True}
    assert "gradient_checkpointing" not in plain["speed"]
    assert checkpointed["final_train_loss"] == pytest.approx(plain["final_train_loss"], rel=1e-5)
    assert checkpointed["metrics"]["test"]["loss"] == pytest.approx(plain["metrics"]["test"]["loss"], rel=1e-5)


def method_specs() -> list[dict]:
    """One spec per method and per kind of each (PEFT's types, prefix tuning's two variants)."""
    from peftlab.methods.specs import PEFT_TYPES, SPECS

    specs = []
    for name in SPECS:
        if name == "peft":
            specs += [{"name": "peft", "type": t} for t in PEFT_TYPES]
        elif name == "prefix":
            specs += [{"name": "prefix", "variant": v, "num_virtual_tokens": 2} for v in ("prefix", "prompt")]
        else:
            specs.append({"name": name})
    return specs


REFUSED = {"adalora", "prefix prefix"}  # each refused in one line naming the reason


@pytest.mark.parametrize("method", method_specs(), ids=lambda m: " ".join(str(v) for k, v in m.items() if k != "num_virtual_tokens"))
def test_every_method_trains_with_checkpointing_or_is_refused_before_it_starts(tmp_path, method):
    import json

    from peftlab.errors import PeftlabError

    rows = [{"instruction": f"say {w}", "input": "", "output": w} for w in ["red", "blue", "green", "gold"] * 4]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    values = {"model": "tiny-llama" if method["name"] != "bitfit" else "tiny-gpt2",  # LLaMA has no biases
              "task": {"path": str(tmp_path / "data.json"), "kind": "instruction"}, "method": method,
              "plan": {"placement": "attention", "allocation": 2},
              "train": {"max_steps": 1, "batch_size": 4, "latency_batches": 0, "gradient_checkpointing": True}}
    label = " ".join(str(v) for k, v in method.items() if k in ("name", "variant"))
    if label in REFUSED:
        with pytest.raises(PeftlabError, match=f"train.gradient_checkpointing: method {method['name']} cannot use it"):
            validate(RunConfig, values, "test")
        return
    result = run_to_dict(validate(RunConfig, values, "test"), tmp_path / "run")
    assert result["status"] == "done" and result["speed"]["gradient_checkpointing"]["used"], result["speed"]
