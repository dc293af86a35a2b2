"""LoRA's A and B products with the CPU-friendly weight gradient: the values are F.linear's."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_plan
from peft import get_peft_model_state_dict

from peftlab.methods.low_rank import LowRankLinear, low_rank_linear
from peftlab.methods.registry import make_method
from peftlab.methods.specs import LoraSpec
from peftlab.models.load import head_modules, load_model
from peftlab.specs import ModelSpec


@pytest.mark.parametrize("shape", [(96, 4), (4, 96), (6, 6)], ids=["B-like", "A-like", "square"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_outputs_and_gradients_equal_f_linear(shape, precision):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=g, requires_grad=True)
    x = torch.randn(3, 7, shape[1], generator=g, requires_grad=True)
    upstream = torch.randn(3, 7, shape[0], generator=g)
    results = []
    for product in (F.linear, low_rank_linear):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = product(x, weight)
        results.append((y, *torch.autograd.grad((y.float() * upstream).sum(), (x, weight))))
    (y, gx, gw), (y2, gx2, gw2) = results
    assert y2.dtype == y.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert gx2.dtype == gw2.dtype == torch.float32  # gradients in the parameters' dtype, as autocast gives
    tol = 1e-6 if precision == "fp32" else 1e-2
    for a, b in ((y, y2), (gx, gx2), (gw, gw2)):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def test_lora_layers_use_it_and_keep_their_state_dict():
    head = "causal-lm"
    plan = make_plan("tiny-llama", placement="all", allocation=4)
    model = make_method(LoraSpec()).apply(load_model(ModelSpec(name="tiny-llama", head=head), seed=0), plan, [])
    linears = [m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert linears and all(isinstance(m, LowRankLinear) for m in linears)
    assert len(linears) == 2 * len(plan.sites)
    keys = get_peft_model_state_dict(model).keys()
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys) and len(keys) == len(linears)


def test_a_lora_training_step_matches_plain_linears():
    """The same step with LowRankLinear swapped back to nn.Linear gives the same gradients."""
    name, head = "tiny-gpt2", "causal-lm"
    plan = make_plan(name, placement="all", allocation=4)
    base = load_model(ModelSpec(name=name, head=head), seed=0)
    model = make_method(LoraSpec()).apply(base, plan, head_modules(base)).eval()  # eval: no dropout
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B = 0 would leave A without gradient
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = grads()
    swapped = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    for m in swapped:
        m.__class__ = torch.nn.Linear
    plain = grads()
    assert swapped and fast.keys() == plain.keys()
    assert all(torch.allclose(fast[n], plain[n], atol=1e-6, rtol=1e-5) for n in fast)
