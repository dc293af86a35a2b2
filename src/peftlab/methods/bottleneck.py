"""Bottleneck adapters: Houlsby et al. (2019) after the attention output and after the FFN output of
each planned layer; Pfeiffer et al. (2021) after the FFN output only. Each adapter is
y + up(act(down(y))) with `up` initialised to zero, so training starts from the base model.
Adapters cannot be merged; the run records their inference overhead against the bare base."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.base import Method, load_weights, set_head_trainable
from peftlab.models.roles import Role
from peftlab.plans.plan import Plan

AFTER = {"houlsby": (Role.O, Role.DOWN), "pfeiffer": (Role.DOWN,)}


class Bottleneck(nn.Module):
    """Wraps a sublayer's output projection: out + up(act(down(out)))."""

    def __init__(self, base: nn.Module, hidden: int, width: int, activation: str, dropout: float):
        super().__init__()
        self.base = base
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        nn.init.normal_(self.down.weight, std=1e-2)  # near-identity: small down, zero up
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[activation]
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.up(self.dropout(self.act(self.down(out))))


def _targets(plan: Plan, variant: str) -> dict[str, tuple[int, int]]:
    """Module path -> (hidden size, bottleneck width) for each planned site the variant adapts."""
    targets = {}
    for p in plan.sites:
        if p.site.role in AFTER[variant]:
            targets[p.site.path] = (p.site.out_features, p.rank)
    if not targets:
        roles = " and ".join(r.value for r in AFTER[variant])
        raise PeftlabError(f"method bottleneck ({variant}): the plan has no {roles} site; "
                           "place it on those roles (e.g. placement: all or o,down)")
    return targets


def adapters(model: nn.Module) -> dict[str, Bottleneck]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Bottleneck)}


class BottleneckMethod(Method):
    name = "bottleneck"
    adds_parameters = True

    def site_params(self, site, rank: int) -> int:
        """After the variant's roles: down (hidden x width + width) and up (width x hidden + hidden), width
        the planned rank; other planned sites get no adapter."""
        if site.role not in AFTER[self.spec.variant]:
            return 0
        return 2 * site.out_features * rank + rank + site.out_features

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        """Adapters after the planned o / down projections; width = the planned rank there."""
        model.requires_grad_(False)
        for path, (hidden, width) in _targets(plan, self.spec.variant).items():
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            base = getattr(parent, child)
            adapter = Bottleneck(base, hidden, width, self.spec.activation, self.spec.dropout)
            setattr(parent, child, adapter.to(base.weight.device))
        set_head_trainable(model, head)
        return model

    @contextmanager
    def bypassed(self, model: nn.Module):
        """The bare base model, for measuring the adapters' inference overhead."""
        modules = adapters(model).values()
        for m in modules:
            m.enabled = False
        try:
            yield
        finally:
            for m in modules:
                m.enabled = True

    def save(self, model: nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(directory / "bottleneck.safetensors"))
        layout = {path: {"width": m.down.out_features, "hidden": m.down.in_features} for path, m in adapters(model).items()}
        (directory / "bottleneck.json").write_text(json.dumps({"spec": self.spec.model_dump(), "adapters": layout}, indent=2))

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        load_weights(model, directory / "bottleneck.safetensors")
        return model
