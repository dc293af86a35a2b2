"""`peftlab recommend`: a plan under a parameter budget, from importance scores and, when a study is
given, from what the study measured; with the reasons in a few lines."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.analysis.analyze import analyze, degenerate_caution, metric_name
from peftlab.analysis.stats import CONSTANT, compare, judge
from peftlab.config import validate
from peftlab.importance.probe import resolve_importance
from peftlab.methods.registry import dumped_method
from peftlab.plans.allocation import parse_allocation
from peftlab.plans.plan import Plan, plan_on
from peftlab.specs import PlanSpec, RunConfig

TOLERANCE = 0.05  # a study configuration within 5% of the budget counts as within it (budgets match ranks, not params)


@dataclass
class Recommendation:
    plan: Plan
    config: RunConfig  # a run config that trains the recommended plan
    lines: list[str]


def recommend(config: RunConfig, budget: int, measure: str, steps: int = 64, study: Path | None = None) -> Recommendation:
    """The importance-shaped plan at `budget`, or the shape of the study's best configuration within it."""
    def planned(placement: Any, shape: Any) -> tuple[PlanSpec, Plan]:
        """The plan spec as given (an importance shape unresolved) and its plan (scores probed or cached)."""
        spec = PlanSpec.model_validate({"placement": placement, "alpha": config.plan.alpha,
                                        "allocation": {"kind": "budget", "params": budget, "shape": shape}})
        resolved, _ = resolve_importance(config.model_copy(update={"plan": spec}))
        return spec, plan_on(config.model, resolved.plan)

    placement = config.plan.placement.model_dump(mode="json")
    _, uniform = planned(placement, {"kind": "uniform"})
    spec, chosen = planned(placement, {"kind": "importance", "measure": measure, "steps": steps})
    lines = _importance_lines(chosen, uniform, measure)
    method = config.method
    if study is not None:
        picked, study_lines = _from_study(study, budget, config)
        lines += study_lines
        if picked is not None:
            shape, placement, method = picked
            spec, chosen = planned(placement, shape)
    lines.append(f"Proposed: {len(chosen.sites)} sites, ranks {min(p.rank for p in chosen.sites)} to "
                 f"{max(p.rank for p in chosen.sites)}, {chosen.trainable_params:,} trainable parameters "
                 f"(budget {budget:,}, {100 * chosen.share:.3f}% of the base).")
    data = {**config.model_dump(mode="json", by_alias=True), "plan": spec.model_dump(mode="json", by_alias=True),
            "method": method if isinstance(method, (dict, str)) else method.model_dump(mode="json")}
    return Recommendation(chosen, validate(RunConfig, data, "recommended config"), lines)


def _importance_lines(shaped: Plan, uniform: Plan, measure: str) -> list[str]:
    top = sorted(shaped.sites, key=lambda p: -p.rank)[:3]
    lines = [f"Importance ({measure}) gives ranks {min(p.rank for p in shaped.sites)} to {max(p.rank for p in shaped.sites)} "
             f"where a uniform plan at this budget gives r={uniform.sites[0].rank} everywhere; most rank at "
             + ", ".join(f"layer {p.site.layer} {p.site.role.value} (r={p.rank})" for p in top) + "."]

    def attention(p) -> bool:
        return p.site.role.value.startswith("attn")

    def upper(p) -> bool:
        return p.site.layer >= shaped.n_layers / 2

    lines.append(f"Attention gets {100 * _share(shaped, attention):.0f}% of the parameters (uniform: "
                 f"{100 * _share(uniform, attention):.0f}%); the upper half of the layers "
                 f"{100 * _share(shaped, upper):.0f}% (uniform: {100 * _share(uniform, upper):.0f}%).")
    return lines


def _share(plan: Plan, chosen) -> float:
    return sum(p.params for p in plan.sites if chosen(p)) / plan.trainable_params


def _from_study(study: Path, budget: int, config: RunConfig) -> tuple[tuple[Any, Any, Any] | None, list[str]]:
    """(rank shape, placement, method) of the study's best configuration within the budget when it trains a
    ranked method; and lines saying what the study showed."""
    analysis = analyze(study)
    params = {c.label: c.every_metric.get("cost.adapter_params") for c in analysis.configurations}
    fitting = [c for c in analysis.configurations if params[c.label] and params[c.label].mean <= budget * (1 + TOLERANCE)]
    within = [c for c in fitting if c.trained]  # one whose every run is degenerate is no evidence for a proposal
    name = metric_name(analysis.metric)
    if fitting and not within:
        labels = ", ".join(c.label for c in fitting)
        return None, [f"Study {analysis.name}: no configuration within the budget trained ({labels}: every run "
                      "degenerate); the proposal rests on importance alone."]
    if not within:
        cheapest = min(analysis.configurations, key=lambda c: params[c.label].mean if params[c.label] else math.inf)
        return None, [f"Study {analysis.name}: no configuration fits the budget (the cheapest, {cheapest.label}, trains "
                      f"{params[cheapest.label].mean:,.0f} parameters); the proposal rests on importance alone."]
    sign = 1 if analysis.higher_is_better else -1
    best = max(within, key=lambda c: sign * c.summary.mean)
    rivals = [c for c in within if c is not best]
    lines = []
    models = {c.config.get("model", {}).get("name") for c in within}
    if models != {config.model.name}:
        lines.append(f"Study {analysis.name} ran on {', '.join(sorted(map(str, models)))}, not {config.model.name}: "
                     "its evidence may not transfer.")
    line = (f"Study {analysis.name}: within the budget, {best.label} has the best {name} "
            f"({best.summary.mean:.4f}, {best.summary.n} seeds)")
    if rivals:
        tests = [compare(best.quality, c.quality, analysis.test) for c in rivals]
        verdicts = judge(tests, analysis.margin, analysis.higher_is_better, analysis.design)
        corrected = [v.p for v in verdicts]
        beaten = [c.label for c, v in zip(rivals, verdicts) if v.outcome == "better"]
        same = [c.label for c, v in zip(rivals, verdicts) if v.outcome == "equivalent"]
        tied = [f"{c.label} ({t.difference:+.4f}, Holm p={p:.3f})" for c, t, p, v in zip(rivals, tests, corrected, verdicts)
                if v.outcome == "unresolved" and t.test != CONSTANT]
        fixed = [f"{c.label} ({t.difference:+.4f})" for c, t in zip(rivals, tests) if t.test == CONSTANT]
        line += f"; significantly better than {', '.join(beaten)}" if beaten else ""
        line += f"; equivalent within ±{analysis.margin:g} to {', '.join(same)}" if same else ""
        line += f"; unresolved against {', '.join(tied)}" if tied else ""
        line += f"; the same difference on every seed, so untested, from {', '.join(fixed)}" if fixed else ""
        if tied or same:
            line += (". The proposal follows the best mean; the configurations it is equivalent to, or that these "
                     "seeds cannot separate from it, are as defensible")
    lines.append(line + "." + degenerate_caution(best))
    method = best.config.get("method", {})
    if (chosen := dumped_method(method)).size_parameter != "rank":
        lines.append(f"{best.label} uses {chosen.label}, which has no ranks to plan; the proposal keeps the importance plan.")
        return None, lines
    plan = best.config.get("plan", {})
    allocation = plan.get("allocation", {"kind": "uniform"})
    if isinstance(allocation, (str, int)):
        allocation = parse_allocation(allocation)
    shape = allocation.get("shape", allocation) if allocation.get("kind") == "budget" else allocation
    if isinstance(shape, (str, int)):
        shape = parse_allocation(shape)
    shape = {k: v for k, v in shape.items() if k != "scores"}  # an importance shape is probed for this model and task
    kind = f"importance({shape.get('measure', 'gradient')})" if shape.get("kind") == "importance" else shape.get("kind")
    lines.append(f"The proposal takes {best.label}'s placement and rank shape ({kind}), scaled to the budget.")
    return (shape, plan.get("placement", config.plan.placement.model_dump(mode="json")), method), lines
