"""LoRA through PEFT, from the plan: exact module paths, per-site ranks and alphas, verified."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from peft import LoraConfig, get_peft_model
from pydantic import Field
from torch import nn

from peftlab.methods.base import Method, MethodSpecBase
from peftlab.plans.peft_export import lora_config_kwargs, verify_wrapped
from peftlab.plans.plan import Plan


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's wrapper class for the model's head (None: the generic PeftModel)."""
    name = type(model).__name__
    if "ForSequenceClassification" in name:
        return "SEQ_CLS"
    if "ForCausalLM" in name or "LMHeadModel" in name:
        return "CAUSAL_LM"
    return None


class LoraSpec(MethodSpecBase):
    name: Literal["lora"] = "lora"
    dropout: float = Field(0.0, ge=0, lt=1)
    use_dora: bool = False
    """DoRA (Liu et al., 2024): a trained magnitude per output channel on top of the LoRA direction."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski, 2023): scale the update by alpha / sqrt(r) instead of alpha / r."""
    loraplus: bool = False
    """LoRA+ (Hayou et al., 2024): the B matrices learn `loraplus_lr_ratio` times faster than A."""
    loraplus_lr_ratio: float = Field(16.0, gt=0)


class LoraMethod(Method):
    name = "lora"
    adds_parameters = True
    mergeable = True

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        kwargs = lora_config_kwargs(plan, dropout=self.spec.dropout, modules_to_save=head or None)
        config = LoraConfig(task_type=peft_task_type(model), use_dora=self.spec.use_dora,
                            use_rslora=self.spec.use_rslora, **kwargs)
        peft_model = get_peft_model(model, config)
        verify_wrapped(peft_model, plan)
        return peft_model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        groups = super().param_groups(model, lr, weight_decay)
        if not self.spec.loraplus:
            return groups
        is_b = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
        split = []
        for group in groups:
            rest = [p for p in group["params"] if id(p) not in is_b]
            b = [p for p in group["params"] if id(p) in is_b]
            split += [{**group, "params": rest}] if rest else []
            split += [{**group, "params": b, "lr": lr * self.spec.loraplus_lr_ratio}] if b else []
        return split

    def merge(self, model: nn.Module) -> None:
        model.merge_adapter()

    def unmerge(self, model: nn.Module) -> None:
        model.unmerge_adapter()

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)  # loads with PeftModel.from_pretrained(base, directory)
