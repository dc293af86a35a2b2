"""A plan as PEFT `LoraConfig` arguments (exact module paths, never bare suffixes), and the check
that what PEFT wrapped equals the plan: PEFT skips unmatched names and pattern keys silently."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from torch import nn

from peftlab.errors import PeftlabError, PlanMismatchError
from peftlab.plans.plan import Plan


def lora_config_kwargs(plan: Plan, dropout: float = 0.0, modules_to_save: list[str] | None = None) -> dict[str, Any]:
    """Keyword arguments for `peft.LoraConfig` that reproduce `plan` exactly."""
    slices = [p.site for p in plan.sites if p.site.is_slice]
    if slices:
        raise PeftlabError(
            f"the plan adapts {slices[0].role} as a slice of the fused projection {slices[0].path}; "
            "PEFT can only adapt the whole module: select all its parts with placement.fused: whole, or use peftlab's "
            "fused-slice LoRA (method lora)"
        )
    rank = Counter(p.rank for p in plan.sites).most_common(1)[0][0]
    alpha = Counter(p.alpha for p in plan.sites).most_common(1)[0][0]
    # Pattern keys are regexes to PEFT (matched as `(.*\.)?key$`): escape the dots of full paths.
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": [p.site.path for p in plan.sites],
        "rank_pattern": {re.escape(p.site.path): p.rank for p in plan.sites if p.rank != rank},
        "alpha_pattern": {re.escape(p.site.path): p.alpha for p in plan.sites if p.alpha != alpha},
        "lora_dropout": dropout,
        "fan_in_fan_out": any(p.site.kind == "conv1d" for p in plan.sites),
        "modules_to_save": list(modules_to_save) if modules_to_save else None,  # PEFT extends it in place
    }


def wrapped_modules(model: nn.Module, adapter: str = "default", layer_class: type | None = None,
                    size: str | None = "r", alpha: str | None = "lora_alpha") -> dict[str, tuple[Any, float | None]]:
    """Module path (relative to the base model) -> (size, alpha) of every adapted module. `layer_class` is
    PEFT's layer class of the method (LoRA's by default); `size` and `alpha` name the layer's dicts that hold
    them (None: the method has none, read as None)."""
    if layer_class is None:
        from peft.tuners.lora import LoraLayer as layer_class
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, module in base.named_modules():
        if isinstance(module, layer_class) and adapter in module.active_adapters:
            value = getattr(module, alpha, {}).get(adapter) if alpha else None
            out[name] = (getattr(module, size)[adapter] if size else None, None if value is None else float(value))
    return out


def verify_wrapped(model: nn.Module, plan: Plan, adapter: str = "default", layer_class: type | None = None,
                   size: str | None = "r", alpha: str | None = "lora_alpha",
                   expected: dict[str, tuple[Any, float | None]] | None = None) -> None:
    """Raise PlanMismatchError unless the wrapped modules and their ranks (and alphas, where the method has
    them) equal the plan, or `expected` (path -> (size, alpha)) for methods whose size is not the plan's rank."""
    wrapped = wrapped_modules(model, adapter, layer_class, size, alpha)
    if expected is None:
        has_alpha = any(value is not None for _, value in wrapped.values())
        expected = {p.site.path: (p.rank, float(p.alpha) if has_alpha else None) for p in plan.sites}
    planned = {path: (value, None if a is None else float(a)) for path, (value, a) in expected.items()}
    problems = [f"missing {path}" for path in sorted(planned.keys() - wrapped.keys())]
    problems += [f"unplanned {path}" for path in sorted(wrapped.keys() - planned.keys())]
    problems += [
        f"{path}: size/alpha {wrapped[path]} != planned {planned[path]}"
        for path in sorted(planned.keys() & wrapped.keys())
        if wrapped[path] != planned[path]
    ]
    if problems:
        raise PlanMismatchError(f"wrapped modules differ from the plan ({len(problems)}): " + "; ".join(problems[:5]))
