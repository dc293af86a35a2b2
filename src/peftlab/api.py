"""The library entry points, one function per CLI command."""

from __future__ import annotations

from peftlab.config import PlanConfig
from peftlab.models.load import build_skeleton, count_params
from peftlab.models.sites import resolve_sites
from peftlab.plans.plan import Plan, build_plan


def make_plan(config: PlanConfig) -> Plan:
    """Resolve the model's sites on the meta device and build the plan (no weights loaded)."""
    skeleton = build_skeleton(config.model)
    sites = resolve_sites(skeleton, config.model.role_map)
    return build_plan(sites, count_params(skeleton), config.plan, config.model.name)
