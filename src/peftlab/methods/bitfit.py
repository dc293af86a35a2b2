"""BitFit (Ben Zaken et al., 2022): train only bias terms, plus the task head."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.base import Method, load_weights, set_head_trainable
from peftlab.plans.plan import Plan


class BitFitMethod(Method):
    name = "bitfit"
    size_parameter = None

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        model.requires_grad_(False)
        planned = {p.site.path for p in plan.sites}
        found = 0
        for module_name, module in model.named_modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and (self.spec.scope == "all" or module_name in planned):
                bias.requires_grad_(True)
                found += 1
        if not found:
            where = "in the model" if self.spec.scope == "all" else "at the planned sites"
            raise PeftlabError(f"method bitfit: no bias terms {where} ({type(model).__name__} has none to train)")
        set_head_trainable(model, head)
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(directory / "bitfit.safetensors"))

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        load_weights(model, directory / "bitfit.safetensors")
        return model
