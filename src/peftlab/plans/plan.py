"""The plan: an explicit table site -> (rank, alpha) with exact parameter counts, built before any
module changes, printed, saved with every result and checked against what was wrapped."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from peftlab.models.load import build_skeleton, count_params, head_modules
from peftlab.models.sites import ModelSites, Site, resolve_sites
from peftlab.plans.allocation import allocate_ranks
from peftlab.plans.extras import Extra, select_extras
from peftlab.plans.placement import select_sites

if TYPE_CHECKING:
    from peftlab.specs import ModelSpec, PlanSpec


@dataclass(frozen=True)
class PlannedSite:
    site: Site
    rank: int
    alpha: float

    @property
    def params(self) -> int:
        """LoRA parameters: A is r x in, B is out x r."""
        return self.rank * (self.site.in_features + self.site.out_features)

    def to_dict(self) -> dict[str, Any]:
        s = self.site
        row = {
            "layer": s.layer,
            "role": s.role.value,
            "path": s.path,
            "in_features": s.in_features,
            "out_features": s.out_features,
            "rank": self.rank,
            "alpha": self.alpha,
            "params": self.params,
        }
        if s.out_slice:
            row["out_slice"] = list(s.out_slice)
        return row


@dataclass(frozen=True)
class Plan:
    model: str
    model_type: str
    n_layers: int
    base_params: int
    sites: tuple[PlannedSite, ...]
    spec: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    extra: tuple[Extra, ...] = ()  # bias and norm parameters trained besides the adapters (`plans.extras`)

    @property
    def adapter_params(self) -> int:
        """The adapters' parameters (A and B of every site)."""
        return sum(p.params for p in self.sites)

    @property
    def extra_params(self) -> int:
        return sum(e.params for e in self.extra)

    @property
    def trainable_params(self) -> int:
        """Everything the plan trains: the adapters and the planned biases and norms."""
        return self.adapter_params + self.extra_params

    @property
    def share(self) -> float:
        """Trainable adapter parameters as a fraction of the base model's parameters."""
        return self.trainable_params / self.base_params if self.base_params else 0.0

    def totals(self) -> dict[str, Any]:
        totals = {
            "trainable_params": self.trainable_params,
            "base_params": self.base_params,
            "sites": len(self.sites),
            "share": self.share,
        }
        if self.extra:
            totals.update({"adapter_params": self.adapter_params, "bias_params": self._of("bias"),
                           "norm_params": self._of("norm")})
        return totals

    def _of(self, kind: str) -> int:
        return sum(e.params for e in self.extra if e.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "spec": self.spec,
            "sites": [p.to_dict() for p in self.sites],
            "totals": self.totals(),
            "warnings": list(self.warnings),
            **({"extra": [e.to_dict() for e in self.extra]} if self.extra else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def build_plan(model_sites: ModelSites, base_params: int, spec: PlanSpec, model_name: str,
               skeleton: nn.Module | None = None) -> Plan:
    """Placement -> sites, allocation -> ranks, alpha policy -> alphas; with `skeleton`, the biases and norms
    `spec.bias` and `spec.norms` train."""
    sites, warnings = select_sites(model_sites, spec.placement)
    ranks = allocate_ranks(spec.allocation, sites)
    planned = tuple(PlannedSite(s, r, spec.alpha.alpha_for(r)) for s, r in zip(sites, ranks))
    return Plan(
        model=model_name,
        model_type=model_sites.model_type,
        n_layers=model_sites.n_layers,
        base_params=base_params,
        sites=planned,
        spec=spec.model_dump(mode="json", by_alias=True),
        warnings=tuple(warnings),
        extra=select_extras(skeleton, spec.bias, spec.norms, {s.path for s in sites}, head_modules(skeleton))
        if skeleton is not None and (spec.bias != "none" or spec.norms) else (),
    )


def plan_on(model: ModelSpec, spec: PlanSpec, skeleton: nn.Module | None = None) -> Plan:
    """The plan of `spec` on `model`, resolved on its skeleton (the meta device: no weights loaded, the same
    sites and counts as the loaded model); pass `skeleton` where the caller has built it already."""
    skeleton = skeleton if skeleton is not None else build_skeleton(model)
    return build_plan(resolve_sites(skeleton, model.role_map), count_params(skeleton), spec, model.name, skeleton)
