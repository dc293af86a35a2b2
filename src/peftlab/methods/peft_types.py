"""PEFT's other methods on peftlab's plans: `method: {name: peft, type: LOHA, options: {...}}`.

The plan's placement becomes exact module paths, its ranks (and alphas) PEFT's `r` and `rank_pattern` where
the type has ranks; what PEFT wrapped is checked against the plan. Types whose size is not a rank (IA3 has none,
OFT and BOFT a block size, FourierFT a number of frequencies) take it from `options`, and the equal-budget
helper varies that option. Counts are read from the applied model, never from a formula per type.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from functools import reduce
from pathlib import Path
from typing import Any

import peft
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.errors import PeftlabError
from peftlab.methods.base import Method
from peftlab.methods.lora import peft_task_type
from peftlab.methods.specs import PEFT_TYPES
from peftlab.models.roles import Role
from peftlab.models.sites import Site
from peftlab.plans.peft_export import verify_wrapped
from peftlab.plans.plan import Plan, PlannedSite


@dataclass(frozen=True)
class PeftType:
    layer: str  # PEFT's layer class, "module:Class": what `verify_wrapped` looks for
    size: str | None  # "rank": the plan's ranks; the name of the option that sets the size; None: no size
    per_site_ranks: bool = False  # PEFT takes a rank_pattern (and alpha_pattern with `alpha`)
    alpha: bool = False  # the plan's alphas are the type's `alpha`
    conv1d: bool = False  # adapts GPT-2's Conv1D (transposed weights)
    divides_inputs: bool = False  # the size is a block size that must divide each site's input width
    default_size: int | None = None  # PEFT's default for an option size
    size_attribute: str | None = "r"  # the applied layer's dict that holds its size (checked against the plan)
    fixed: tuple[tuple[str, Any], ...] = ()  # config fields peftlab sets (OFT: its size is the block size, not r)

    def layer_class(self) -> type:
        module, name = self.layer.split(":")
        return getattr(importlib.import_module(module), name)


TYPES = {
    "LOHA": PeftType("peft.tuners.loha:LoHaLayer", "rank", per_site_ranks=True, alpha=True),
    "LOKR": PeftType("peft.tuners.lokr:LoKrLayer", "rank", per_site_ranks=True, alpha=True),
    "IA3": PeftType("peft.tuners.ia3:IA3Layer", None, conv1d=True, size_attribute=None),
    "VERA": PeftType("peft.tuners.vera:VeraLayer", "rank", conv1d=True),
    "OFT": PeftType("peft.tuners.oft:OFTLayer", "oft_block_size", divides_inputs=True, default_size=32,
                    size_attribute="oft_block_size", fixed=(("r", 0),)),
    "BOFT": PeftType("peft.tuners.boft:BOFTLayer", "boft_block_size", divides_inputs=True,
                     default_size=4, size_attribute="boft_block_size", fixed=(("boft_block_num", 0),)),
    "FOURIERFT": PeftType("peft.tuners.fourierft:FourierFTLayer", "n_frequency", conv1d=True,
                          default_size=1000, size_attribute="fourierft_n_frequency"),
}
PEFT_ERRORS = (ValueError, TypeError, NotImplementedError)  # how PEFT refuses a config or a module


def _wrap(model: nn.Module, config) -> nn.Module:
    with warnings.catch_warnings(record=True) as caught:  # BOFT tries to build its CUDA kernel for every layer
        warnings.simplefilter("always")
        wrapped = get_peft_model(model, config)
    fell_back = any("Setting boft_n_butterfly_factor to 1" in str(w.message) for w in caught)
    if fell_back and getattr(config, "boft_n_butterfly_factor", 1) > 1:
        raise PeftlabError(f"method.options.boft_n_butterfly_factor: {config.boft_n_butterfly_factor} needs BOFT's "
                           "CUDA extension, which PEFT could not build here (it would train with 1); set 1, or train "
                           "on CUDA with ninja installed")
    for w in caught:  # the rest as they came, without BOFT's notes on its fallback
        if not any(note in str(w.message) for note in ("Failed to load the CUDA extension",
                                                         "Setting boft_n_butterfly_factor to 1")):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return wrapped


class PeftTypeMethod(Method):
    name = "peft"
    adds_parameters = True

    def __init__(self, spec: Any, total_steps: int | None = None):
        super().__init__(spec, total_steps)
        self.type = TYPES[spec.type]
        self.config_class = PEFT_TYPES[spec.type]

    @property
    def size_parameter(self) -> str | None:  # type: ignore[override]
        return self.type.size

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return True  # every type in TYPES folds into the base weights

    @property
    def counted_per_site(self) -> bool:  # type: ignore[override]
        return True  # whatever sets its size, each type's count is per wrapped module

    @property
    def size(self) -> int | None:
        """The type's option size (block size, frequencies); None for rank types and types without a size."""
        if self.type.size in (None, "rank"):
            return None
        return int(self.spec.options.get(self.type.size, self.type.default_size))

    def sized_spec(self, size: int):
        return self.spec.model_copy(update={"options": {**self.spec.options, self.type.size: size}})

    def size_candidates(self, plan: Plan) -> list[int] | None:
        """Block sizes that divide every planned site's input width (a block of 1 trains nothing)."""
        if not self.type.divides_inputs:
            return None
        common = reduce(math.gcd, (p.site.in_features for p in plan.sites))
        return [d for d in range(2, common + 1) if common % d == 0]

    def config(self, plan: Plan, head: list[str] | None, model: nn.Module | None = None):
        """The type's PEFT config for `plan` (exact module paths; ranks, alphas and sizes from the plan)."""
        self._check_sites(plan)
        kwargs: dict[str, Any] = {"target_modules": [p.site.path for p in plan.sites],
                                  "modules_to_save": list(head) if head else None}
        ranks = Counter(p.rank for p in plan.sites)
        rank = ranks.most_common(1)[0][0]
        if self.type.size == "rank":
            kwargs["r"] = rank
            if self.type.per_site_ranks:
                kwargs["rank_pattern"] = {p.site.path: p.rank for p in plan.sites if p.rank != rank}
        if len(ranks) > 1 and not self.type.per_site_ranks:
            what = ("takes one rank for every site" if self.type.size == "rank" else
                    f"its size is {self.type.size}, not a rank" if self.type.size else "has no size")
            raise PeftlabError(f"method {self.label}: {what}, and the plan's allocation gives ranks "
                               f"{sorted(ranks)[0]}-{sorted(ranks)[-1]}; use a uniform allocation")
        if self.type.alpha:
            alphas = Counter(p.alpha for p in plan.sites)
            alpha = alphas.most_common(1)[0][0]
            kwargs["alpha"] = alpha
            kwargs["alpha_pattern"] = {p.site.path: p.alpha for p in plan.sites if p.alpha != alpha}
        if self.type.conv1d:
            kwargs["fan_in_fan_out"] = any(p.site.kind == "conv1d" for p in plan.sites)
        if self.spec.type == "IA3":  # the paper's l_ff scales the FFN's intermediate activation: down's input
            kwargs["feedforward_modules"] = [p.site.path for p in plan.sites if p.site.role == Role.DOWN]
        kwargs.update(self.type.fixed)
        if self.size is not None:
            kwargs[self.type.size] = self.size
        try:
            return getattr(peft, self.config_class)(task_type=peft_task_type(model) if model is not None else None,
                                                   **{**self.spec.options, **kwargs})
        except PEFT_ERRORS as exc:
            raise PeftlabError(f"method.options: PEFT's {self.config_class} refuses them: {exc}") from None

    def _check_sites(self, plan: Plan) -> None:
        if not plan.sites:
            raise PeftlabError(f"method {self.label}: the plan has no sites")
        slices = [p.site for p in plan.sites if p.site.is_slice]
        if slices:
            raise PeftlabError(f"method {self.label}: the plan adapts {slices[0].role.value} as a slice of "
                               f"the fused projection {slices[0].path}; PEFT adapts whole modules: select q, k and "
                               "v together")
        if not self.type.conv1d and any(p.site.kind == "conv1d" for p in plan.sites):
            raise PeftlabError(f"method {self.label}: PEFT's {self.spec.type} cannot adapt GPT-2's Conv1D "
                               "projections; on GPT-2 use IA3, VERA, FOURIERFT or lora")
        size = self.size
        if self.type.divides_inputs and size is not None:
            bad = sorted({p.site.in_features for p in plan.sites if p.site.in_features % size})
            if bad:
                raise PeftlabError(f"method.options.{self.type.size}: {size} does not divide the input widths "
                                   f"{bad}; valid: {self.size_candidates(plan)}")

    def check_plan(self, plan: Plan) -> None:
        self._check_sites(plan)
        if self.spec.options.get("boft_n_butterfly_factor", 1) > 1 and not torch.cuda.is_available():
            raise PeftlabError(f"method.options.boft_n_butterfly_factor: {self.spec.options['boft_n_butterfly_factor']} "
                               "needs BOFT's CUDA extension, and this machine has no CUDA device (PEFT would train "
                               "with 1); set 1")

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        config = self.config(plan, head, model)
        try:
            peft_model = _wrap(model, config)
        except PEFT_ERRORS as exc:
            raise PeftlabError(f"method {self.label}: PEFT refuses this plan: {exc}") from None
        expected = {p.site.path: (p.rank if self.type.size == "rank" else self.size, p.alpha if self.type.alpha else None)
                    for p in plan.sites}
        verify_wrapped(peft_model, plan, layer_class=self.type.layer_class(), size=self.type.size_attribute,
                       alpha="alpha" if self.type.alpha else None, expected=expected)
        return peft_model

    def site_params(self, site: Site, rank: int) -> int:
        """What PEFT's layer of this type trains on one module of the site's shape (built on the meta device)."""
        with torch.device("meta"):
            module = Conv1D(site.out_features, site.in_features) if site.kind == "conv1d" else \
                nn.Linear(site.in_features, site.out_features)
        alone = Plan(model="site", model_type="site", n_layers=1, base_params=0,
                     sites=(PlannedSite(replace(site, path="site"), rank, float(rank)),))
        wrapped = _wrap(nn.ModuleDict({"site": module}), self.config(alone, None))
        return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)

    def bypassed(self, model: nn.Module):
        """The bare base: FourierFT starts from a random spectrum (PEFT's default, the paper's), so the model
        before training is not the base; the base loss and the base latency are read through this."""
        return model.disable_adapter()

    def merge(self, model: nn.Module) -> None:
        model.merge_adapter()

    def unmerge(self, model: nn.Module) -> None:
        with warnings.catch_warnings():  # IA3 divides by its scales again: exact up to rounding
            warnings.filterwarnings("ignore", "Unmerge result can be inaccurate")
            model.unmerge_adapter()

    def save(self, model: nn.Module, directory: Path) -> None:
        """PEFT format: loads with PeftModel.from_pretrained on the base model."""
        model.save_pretrained(directory)
