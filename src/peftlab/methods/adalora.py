"""AdaLoRA (Zhang et al., 2023) through PEFT: starts every planned site at 1.5x the plan's mean rank and
prunes singular values by importance down to the plan's budget. The reallocation runs in the method's
per-step hook; the final per-module ranks are reported with the run (an empirical allocation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora import AdaLoraLayer
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.base import Method
from peftlab.methods.lora import peft_task_type
from peftlab.plans.peft_export import lora_config_kwargs
from peftlab.plans.plan import Plan


class AdaLoraMethod(Method):
    name = "adalora"
    resumable = False  # its rank allocator's importance averages live outside the parameters
    adds_parameters = True

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        if not self.total_steps:
            raise PeftlabError("method adalora needs the run's number of steps (train.max_steps or epochs)")
        kwargs = lora_config_kwargs(plan, modules_to_save=head or None)
        target = max(1, round(sum(p.rank for p in plan.sites) / len(plan.sites)))  # the plan's budget per module
        cap = min(min(p.site.in_features, p.site.out_features) for p in plan.sites)
        tinit = round(self.spec.warmup_fraction * self.total_steps)
        tfinal = round(self.spec.final_fraction * self.total_steps)
        if self.total_steps - tinit - tfinal < 1:
            raise PeftlabError(f"method adalora: {self.total_steps} steps leave no room to prune "
                               "between warmup_fraction and final_fraction; train longer")
        config = AdaLoraConfig(
            task_type=peft_task_type(model), target_modules=kwargs["target_modules"],
            init_r=min(cap, max(target + 1, round(self.spec.init_ratio * target))), target_r=target,
            lora_alpha=kwargs["lora_alpha"], lora_dropout=self.spec.dropout, fan_in_fan_out=kwargs["fan_in_fan_out"],
            modules_to_save=kwargs["modules_to_save"], tinit=tinit, tfinal=tfinal,
            deltaT=max(1, self.total_steps // 50), orth_reg_weight=self.spec.orth_reg_weight, total_step=self.total_steps,
        )
        peft_model = get_peft_model(model, config)
        for name, param in peft_model.named_parameters():
            if ".ranknum." in name:  # a constant; PEFT's flag is lost when the model is on the meta device
                param.requires_grad_(False)
        wrapped = {n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, AdaLoraLayer)}
        if wrapped != {p.site.path for p in plan.sites}:
            raise PeftlabError(f"adalora wrapped {len(wrapped)} modules, the plan has {len(plan.sites)}")
        return peft_model

    def site_params(self, site, rank: int) -> int:
        """At the planned (final) rank: P (r x in), Q (out x r) and the r singular values; training starts
        from `init_ratio` times that rank and prunes down to it."""
        return rank * (site.in_features + site.out_features + 1)

    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        model.base_model.update_and_allocate(step)

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """PEFT adds this inside its forward only when the model computes the loss; peftlab computes
        the loss itself, so the orthogonality penalty on P (lora_A) and Q (lora_B) is added here."""
        terms = []
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_A" in name or "lora_B" in name):
                gram = param @ param.T if "lora_A" in name else param.T @ param
                eye = torch.eye(*gram.shape, device=gram.device, dtype=gram.dtype)
                terms.append(torch.norm(gram - eye, p="fro"))
        return self.spec.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def report(self, model: nn.Module) -> dict[str, Any]:
        """Final rank of every module (singular values left unmasked) and the parameters they use."""
        base = model.get_base_model()
        layers = {n: m for n, m in base.named_modules() if isinstance(m, AdaLoraLayer) and "default" in m.lora_E}
        ranks = {n: int((m.lora_E["default"] != 0).sum()) for n, m in layers.items()}
        params = sum(r * (layers[n].in_features + layers[n].out_features) for n, r in ranks.items())
        return {"final_ranks": ranks, "final_params": params}

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
