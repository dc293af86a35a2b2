"""LoRA through PEFT, from the plan: exact module paths, per-site ranks and alphas, verified."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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


class LoraMethod(Method):
    name = "lora"
    adds_parameters = True
    mergeable = True

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        kwargs = lora_config_kwargs(plan, dropout=self.spec.dropout, modules_to_save=head or None)
        config = LoraConfig(task_type=peft_task_type(model), **kwargs)
        peft_model = get_peft_model(model, config)
        verify_wrapped(peft_model, plan)
        return peft_model

    def merge(self, model: nn.Module) -> None:
        model.merge_adapter()

    def unmerge(self, model: nn.Module) -> None:
        model.unmerge_adapter()

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)  # loads with PeftModel.from_pretrained(base, directory)
