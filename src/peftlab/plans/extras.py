"""Parameters a plan trains besides its adapters: bias terms (`plan.bias`: of the adapted modules, PEFT's
`lora_only`, or every bias of the backbone, PEFT's `all`) and LayerNorm / RMSNorm weights (`plan.norms`, the
LoRA paper's Adapter^L baseline and Houlsby adapters' trainable norms).

They are chosen on the model's skeleton by parameter name (the name in the unwrapped model: `bert.encoder.
layer.0.attention.self.query.bias`), counted in the plan, switched to trainable after the method wraps the
model (found again under the wrappers' names), and saved beside the adapter in `extras.safetensors`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import PeftlabError

FILE = "extras.safetensors"
WRAPPERS = ("base_layer", "base")  # path components the methods' wrappers add around a module they adapt


@dataclass(frozen=True)
class Extra:
    name: str  # the parameter's name in the unwrapped model
    kind: str  # bias | norm
    params: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": self.params}


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or an RMSNorm of any family (transformers defines one class per model: LlamaRMSNorm, ...)."""
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def select_extras(model: nn.Module, bias: str, norms: bool, adapted: set[str], head: list[str]) -> tuple[Extra, ...]:
    """The bias and norm parameters `plan.bias` and `plan.norms` train on `model` (its skeleton will do), the task
    head's left out (it trains anyway): biases of the `adapted` module paths, or of every module; every
    parameter of every norm."""
    chosen: dict[str, Extra] = {}
    for path, module in model.named_modules():
        if path.split(".")[0] in head:
            continue
        if norms and is_norm(module):
            for name, param in module.named_parameters(recurse=False):
                chosen[f"{path}.{name}"] = Extra(f"{path}.{name}", "norm", param.numel())
        own_bias = getattr(module, "bias", None)
        if isinstance(own_bias, nn.Parameter) and (bias == "all" or (bias == "adapted" and path in adapted)) \
                and f"{path}.bias" not in chosen:
            chosen[f"{path}.bias"] = Extra(f"{path}.bias", "bias", own_bias.numel())
    return tuple(chosen.values())


def unwrapped_name(name: str) -> str:
    """A wrapped model's parameter name as the unwrapped model names it (PEFT's `base_model.model.` prefix and the
    wrappers' `base_layer` / `base` components removed)."""
    name = re.sub(r"^base_model\.model\.", "", name)
    return ".".join(part for part in name.split(".") if part not in WRAPPERS)


def extra_parameters(model: nn.Module, extras: tuple[Extra, ...]) -> dict[str, nn.Parameter]:
    """The adapted `model`'s parameters for `extras`, by their unwrapped names; one line where a method replaced
    one (nothing trainable is left half set up)."""
    wanted = {e.name for e in extras}
    found = {key: p for name, p in model.named_parameters() if (key := unwrapped_name(name)) in wanted}
    missing = sorted(wanted - found.keys())
    if missing:
        raise PeftlabError(f"plan.bias / plan.norms: {len(missing)} planned parameter(s) are not in the adapted model "
                           f"(e.g. {missing[0]}): this method replaces them; leave plan.bias and plan.norms off")
    return found


def train_extras(model: nn.Module, extras: tuple[Extra, ...]) -> None:
    """Switch the planned bias and norm parameters to trainable, after the method has wrapped `model`."""
    for param in extra_parameters(model, extras).values():
        param.requires_grad_(True)


def save_extras(model: nn.Module, extras: tuple[Extra, ...], directory: Path) -> None:
    """The trained bias and norm parameters, by unwrapped name, in `directory/extras.safetensors` (none: no file)."""
    if not extras:
        return
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in extra_parameters(model, extras).items()}
    save_file(tensors, str(directory / FILE))


def load_extras(model: nn.Module, directory: Path) -> nn.Module:
    """Copy saved bias and norm parameters into an adapted `model` (no file: nothing to load)."""
    file = directory / FILE
    if not file.is_file():
        return model
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    params = {unwrapped_name(name): p for name, p in model.named_parameters()}
    unknown = sorted(set(tensors) - params.keys())
    if unknown:
        raise PeftlabError(f"{file}: parameters this model does not have: {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model
