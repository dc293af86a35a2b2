"""QLoRA: a 4-bit NF4 base (double quantization) under LoRA on the plan, on CPU."""

import pytest
import torch
from conftest import make_plan
from peft import PeftModel
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.base import trainable_counts
from peftlab.methods.registry import make_method
from peftlab.methods.specs import QLoraSpec
from peftlab.models.load import count_params, head_modules, load_model, unwrap
from peftlab.models.quantize import is_4bit, quantize_4bit, weight_bytes
from peftlab.specs import ModelSpec
from peftlab.train.loop import make_optimizer

ARCHS = [("tiny-gpt2", "causal-lm"), ("tiny-bert", "sequence-classification"),
         ("tiny-distilbert", "sequence-classification"), ("tiny-llama", "causal-lm")]


def tiny(name, head):
    model = load_model(ModelSpec(name=name, head=head), seed=0)
    for module in model.modules():  # exact comparisons in training mode (the 4-bit CPU kernel's fp32 path)
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def ids():
    return torch.randint(200, 2000, (2, 12), generator=torch.Generator().manual_seed(0))


def qlora(name, head, **spec):
    base = tiny(name, head)
    method = make_method(QLoraSpec(**spec))
    model = method.apply(base, make_plan(name, placement="all", allocation=4), head_modules(base))
    return method, model


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits.float()


@pytest.mark.parametrize("name, head", ARCHS)
def test_every_backbone_linear_is_4bit_and_counts_are_logical(name, head):
    fp = tiny(name, head)
    heads = head_modules(fp)
    method, model = qlora(name, head)
    base = unwrap(model)
    four_bit = [n for n, p in base.named_parameters() if is_4bit(p)]
    assert len(four_bit) == len(method.quantized.paths) > 0
    assert not any(h in n.split(".") for n in four_bit for h in heads)  # the head stays in full precision
    if fp.get_output_embeddings() is not None:
        assert not is_4bit(base.get_output_embeddings().weight)
    # a packed 4-bit tensor stores two weights per byte, yet counts as its logical size
    packed = next(p for p in base.parameters() if is_4bit(p))
    assert packed.numel() * 2 == packed.quant_state.shape.numel()
    counts = trainable_counts(model, heads)
    assert counts["adapter"] == make_plan(name, placement="all", allocation=4).trainable_params
    frozen_without_head_copy = count_params(model) - counts["adapter"] - counts["head"]
    assert frozen_without_head_copy == count_params(fp)
    sizes = weight_bytes(model)
    assert sizes["quantized"] < 0.4 * 2 * sizes["quantized_params"]  # tiny 64-wide layers: tables dominate


@pytest.mark.parametrize("name, head", ARCHS)
def test_merged_16bit_copy_equals_the_4bit_model(name, head):
    method, model = qlora(name, head)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()  # dropout is off; training mode keeps bitsandbytes on its fp32 CPU path
    unmerged = logits(model)
    exact = method.merged_model(model, dtype=torch.float32)
    assert not any(is_4bit(p) for p in exact.parameters())
    assert torch.allclose(logits(exact), unmerged, atol=1e-5)
    half = method.merged_model(model)  # bf16 by default
    assert next(half.parameters()).dtype == torch.bfloat16
    assert torch.allclose(logits(half), unmerged, atol=0.05, rtol=0.05)
    assert torch.equal(logits(model), unmerged)  # the 4-bit model itself was not touched
    with pytest.raises(PeftlabError, match="16-bit copy"):
        method.merge(model)


def test_loss_falls_and_only_adapters_change():
    from peftlab.train.loss import batch_nll

    torch.manual_seed(0)
    method, model = qlora("tiny-llama", "causal-lm")
    batch = {"input_ids": ids(), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = make_optimizer("paged-adamw-8bit", method.param_groups(model, 1e-2, 0.0))
    model.train()
    losses = []
    for _ in range(20):
        nll, count, _ = batch_nll(model, batch, "instruction")
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((nll / count).item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_saved_adapter_loads_onto_a_freshly_quantized_base(tmp_path):
    method, model = qlora("tiny-bert", "sequence-classification")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "classifier" in n:
                p.normal_(0, 0.05)
    model.train()
    expected = logits(model)
    method.save(model, tmp_path / "adapter")
    fresh = tiny("tiny-bert", "sequence-classification")
    quantize_4bit(fresh, skip=head_modules(fresh), compute_dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    loaded.train()
    assert torch.allclose(logits(loaded), expected, atol=1e-5)


def test_slices_of_a_fused_projection_are_a_clear_error():
    with pytest.raises(PeftlabError, match="QLoRA adapts whole modules"):
        make_method(QLoraSpec()).apply(tiny("tiny-gpt2", "causal-lm"), make_plan("tiny-gpt2", placement="q,v"), [])


@pytest.mark.parametrize("name, head", [("tiny-llama", "causal-lm"), ("tiny-gpt2", "causal-lm")])
def test_cpu_gradients_equal_those_of_the_dequantized_base(name, head):
    """An evaluation pass first (bitsandbytes may repack CPU weights for inference there, into a layout whose
    kernel has no backward); then every LoRA gradient equals that of full-precision layers holding the
    dequantized weights under the same adapters."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from peftlab.methods.lora import LoraMethod
    from peftlab.models.quantize import dequantized_weight

    method, model = qlora(name, head)
    for p in model.parameters():  # B = 0 at init would leave A's gradient zero: give every adapter weight a value
        if p.requires_grad:
            nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids()[:1, :1])  # one token, no gradient: the inference path
    model.train()
    gradients = lora_gradients(model)  # before anything reads the 4-bit weights back

    reference = tiny(name, head)
    for path in method.quantized.paths:
        layer = unwrap(model).get_submodule(path)
        weight = dequantized_weight(getattr(layer, "base_layer", layer))
        reference.get_submodule(path).weight.data.copy_(weight.t() if path in method.quantized.transposed else weight)
    reference = LoraMethod(method.spec).apply(reference, make_plan(name, placement="all", allocation=4),
                                              head_modules(reference))
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model))
    expected = lora_gradients(reference.train())
    assert gradients.keys() == expected.keys() and len(gradients) > 0
    for key in gradients:
        torch.testing.assert_close(gradients[key], expected[key], rtol=1e-4, atol=1e-6,
                                   msg=lambda message, key=key: f"{key}: {message}")


def lora_gradients(model):
    model.zero_grad()
    model(input_ids=ids(), labels=ids()).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
