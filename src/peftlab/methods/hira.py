"""HiRA (Huang et al., 2025) through PEFT: a Hadamard high-rank update dW = W0 * (B A), on the plan."""

from __future__ import annotations

from pathlib import Path

from peft import HiraConfig, get_peft_model
from peft.tuners.hira import HiraLayer
from torch import nn

from peftlab.methods.base import Method
from peftlab.methods.lora import peft_task_type
from peftlab.plans.peft_export import lora_config_kwargs, verify_wrapped
from peftlab.plans.plan import Plan


class HiraMethod(Method):
    name = "hira"
    adds_parameters = True
    mergeable = True

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        lora = lora_config_kwargs(plan, modules_to_save=head or None)  # HiRA has no alpha: dW = W0 * (B A)
        config = HiraConfig(
            task_type=peft_task_type(model), r=lora["r"], target_modules=lora["target_modules"],
            rank_pattern=lora["rank_pattern"], hira_dropout=self.spec.dropout,
            fan_in_fan_out=lora["fan_in_fan_out"], modules_to_save=lora["modules_to_save"],
        )
        peft_model = get_peft_model(model, config)
        # PEFT's HiRA ignores rank_pattern (every module gets r): give each layer its planned rank.
        planned = {p.site.path: p.rank for p in plan.sites}
        for path, module in peft_model.get_base_model().named_modules():
            if isinstance(module, HiraLayer) and module.r.get("default") != planned.get(path, module.r.get("default")):
                module.update_layer("default", planned[path], config=config)
        verify_wrapped(peft_model, plan, layer_class=HiraLayer)
        return peft_model

    def merge(self, model: nn.Module) -> None:
        model.merge_adapter()

    def unmerge(self, model: nn.Module) -> None:
        model.unmerge_adapter()

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
