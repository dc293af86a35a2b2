"""Rank allocation: how much rank each planned site gets. A strategy is a spec class that registers itself by
its `kind` when defined (as methods do); `AllocationSpec` is the union over the registry.

Each strategy gives a real-valued *shape* per site; ranks are the shape rounded, or for
`budget` the shape scaled so the total trainable parameters come closest to a target. Every strategy defined
before `BudgetAllocation` can be a budget's shape.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peftlab.errors import PeftlabError
from peftlab.files import require_file
from peftlab.models.roles import FUSED_PARTS, GROUPS, Role, parse_role

if TYPE_CHECKING:  # sites are torch-side; validating an allocation must not import torch
    from peftlab.models.sites import Site


class _Allocation(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    positional: ClassVar[tuple[str, ...]] = ()  # field names filled by `kind(a, b)` in compact form
    registry: ClassVar[dict[str, type[_Allocation]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _Allocation.registry[cls.model_fields["kind"].default] = cls

    def shape(self, sites: Sequence[Site]) -> list[float]:
        raise NotImplementedError


class UniformAllocation(_Allocation):
    """The same rank r at every site."""

    kind: Literal["uniform"] = "uniform"
    rank: int = Field(8, ge=1)
    """The rank at every site."""
    positional: ClassVar = ("rank",)

    def shape(self, sites):
        return [float(self.rank)] * len(sites)


class LinearAllocation(_Allocation):
    """Rank interpolated linearly with depth from the first adapted layer (`first`) to the last (`last`)."""

    kind: Literal["linear"] = "linear"
    first: int = Field(ge=1)
    """The rank at the first (lowest) adapted layer."""
    last: int = Field(ge=1)
    """The rank at the last (highest) adapted layer."""
    positional: ClassVar = ("first", "last")

    def shape(self, sites):
        lo, hi = min(s.layer for s in sites), max(s.layer for s in sites)
        span = max(hi - lo, 1)
        return [self.first + (self.last - self.first) * (s.layer - lo) / span for s in sites]


ROLE_WEIGHT_PRESETS = {
    "attention-heavy": {"attn": 2.0, "ffn": 1.0},
    "ffn-heavy": {"attn": 1.0, "ffn": 2.0},
}


class RoleWeightedAllocation(_Allocation):
    """rank x weight[role]; weights are keyed by role (`q`, `attn.o`) or group (`attn`, `ffn`), default 1."""

    kind: Literal["role-weighted"] = "role-weighted"
    rank: int = Field(8, ge=1)
    """The base rank, multiplied by each site's weight."""
    weights: dict[str, float]
    """Role (`q`, `attn.o`) or group (`attn`, `ffn`) -> weight; a role named directly wins over its group; default
    1. `attention-heavy(8)` is {attn: 2, ffn: 1}, `ffn-heavy(8)` the reverse."""
    positional: ClassVar = ("rank",)

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for key, weight in value.items():
            if key not in GROUPS:
                parse_role(key)
            if weight < 0:
                raise ValueError(f"weight for {key!r} must be >= 0, got {weight}")
        return value

    def weight(self, role: Role) -> float:
        members = set(FUSED_PARTS.get(role, (role,)))
        for key, weight in self.weights.items():  # a role named directly wins over its group
            if key not in GROUPS and parse_role(key) in members | {role}:
                return weight
        for key, weight in self.weights.items():
            if key in GROUPS and members <= GROUPS[key]:
                return weight
        return 1.0

    def shape(self, sites):
        return [self.rank * self.weight(s.role) for s in sites]


def _min_at_most_max(spec):
    """The [min, max] rank clamp of a score-shaped allocation is not empty."""
    if spec.min > spec.max:
        raise ValueError(f"min ({spec.min}) must be <= max ({spec.max})")
    return spec


class FromScoresAllocation(_Allocation):
    """Ranks proportional to per-site importance scores from a file, mean `rank`, clamped to [min, max].

    The file is JSON (a list, or {"sites": [...]}) or CSV with `layer`, `role` and `score` (or `path`
    and `score`). A fused `attn.qkv` site without its own score takes the mean of its q, k, v scores.
    """

    kind: Literal["from-scores"] = "from-scores"
    path: Path
    """The scores file (JSON or CSV), e.g. written by `peftlab importance`."""
    rank: float = Field(8.0, gt=0)
    """The mean rank over the planned sites."""
    min: int = Field(1, ge=1)
    """The smallest rank a site gets."""
    max: int = Field(64, ge=1)
    """The largest rank a site gets."""
    positional: ClassVar = ("path",)

    _check_range = model_validator(mode="after")(_min_at_most_max)

    def shape(self, sites):
        return shape_from_scores(self.path, sites, self.rank, self.min, self.max)


@dataclass(frozen=True)
class ImportanceMeasure:
    """An importance measure, as configs name it; `peftlab.importance.probe` implements each kind of probe."""

    name: str
    probe: str
    """gradient: gradients of the loss over `steps` batches, nothing updated; activation: the sites' inputs over
    `steps` batches; training: a short run of `steps` optimizer steps at the mean rank."""
    description: str


MEASURES: dict[str, ImportanceMeasure] = {m.name: m for m in (
    ImportanceMeasure("gradient", "gradient", "smoothed |w * dL/dw| (AdaLoRA's sensitivity x uncertainty)"),
    ImportanceMeasure("fisher", "gradient", "mean squared gradient (the diagonal empirical Fisher information)"),
    ImportanceMeasure("activation", "activation", "explained variance of the site's inputs, ranks pooled across sites "
                                                  "as in EVA"),
    ImportanceMeasure("update", "training", "effective rank of each site's update after a short uniform-rank LoRA run"),
    ImportanceMeasure("adalora", "training", "AdaLoRA's final ranks after a short run"),
)}


def check_measure(name: str) -> ImportanceMeasure:
    if name not in MEASURES:
        raise PeftlabError(f"--measure {name!r}: valid measures are {', '.join(MEASURES)}")
    return MEASURES[name]


def steps_help() -> str:
    """What a probe's `steps` counts, per measure."""
    trained = [m.name for m in MEASURES.values() if m.probe == "training"]
    batches = [m.name for m in MEASURES.values() if m.probe != "training"]
    return f"Probe batches ({', '.join(batches)}) or training steps ({', '.join(trained)})."


class ImportanceAllocation(_Allocation):
    """Ranks proportional to importance measured by a short probe of the run's own model and task (see
    `peftlab.importance`), mean `rank`, clamped to [min, max]. The probe runs once and is cached; `scores`
    is filled in by the run before the plan is built (`peftlab plan` takes `from-scores` instead)."""

    kind: Literal["importance"] = "importance"
    measure: Literal[tuple(MEASURES)] = "gradient"  # type: ignore[valid-type]
    """A key of `MEASURES`: gradient, fisher, activation, update or adalora (each record says what it measures)."""
    rank: float = Field(8.0, gt=0)
    """Mean rank; also the rank of the probe's LoRA / AdaLoRA run (update, adalora)."""
    min: int = Field(1, ge=1)
    """The smallest rank a site gets."""
    max: int = Field(64, ge=1)
    """The largest rank a site gets."""
    steps: int = Field(64, ge=1)
    """Probe batches (gradient, fisher, activation) or optimizer steps (update, adalora)."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """The probe's seed: fixed across training seeds, so every seed of a study trains the same plan."""
    scores: Path | None = None
    """Filled in by the run: the probe's cached scores file. Leave it out."""
    positional: ClassVar = ("measure",)

    _check_range = model_validator(mode="after")(_min_at_most_max)

    def shape(self, sites):
        if self.scores is None:
            raise PeftlabError(
                f"plan.allocation: importance({self.measure}) needs a model and a task to probe; use it with "
                "`peftlab run` or a study, or write scores with `peftlab importance` and use from-scores(file)"
            )
        return shape_from_scores(self.scores, sites, self.rank, self.min, self.max)


def shape_from_scores(path: Path, sites: Sequence[Site], rank: float, low: int, high: int) -> list[float]:
    scores = read_scores(path)
    values = [_score_for(site, scores, path) for site in sites]
    mean = sum(values) / len(values)
    if mean <= 0:
        raise PeftlabError(f"{path}: every planned site scores 0; cannot allocate ranks from it")
    return [min(high, max(low, rank * v / mean)) for v in values]


ShapeSpec = Annotated[Union[tuple(_Allocation.registry.values())], Field(discriminator="kind", alias="shape")]  # noqa: UP007
"""Every strategy defined above: what a budget scales."""


class BudgetAllocation(_Allocation):
    """Any shape scaled to integer ranks whose total trainable parameters come closest to `params`."""

    kind: Literal["budget"] = "budget"
    params: int = Field(gt=0)
    """Trainable adapter parameters to come closest to (the head excluded)."""
    shape_: ShapeSpec = UniformAllocation()
    """The allocation whose shape is scaled (default uniform): e.g. `budget(100000, linear(16->4))`."""
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, populate_by_name=True,
                              serialize_by_alias=True)
    positional: ClassVar = ("params", "shape")

    @field_validator("shape_", mode="before")
    @classmethod
    def _parse_shape(cls, value: Any) -> Any:
        return parse_allocation(value) if isinstance(value, str) else value

    def shape(self, sites):
        return self.shape_.shape(sites)


ALLOCATIONS = _Allocation.registry
AllocationSpec = Annotated[Union[tuple(ALLOCATIONS.values())], Field(discriminator="kind")]  # noqa: UP007


def allocate_ranks(spec: _Allocation, sites: Sequence[Site]) -> list[int]:
    """Integer ranks for `sites`; every rank is checked against 1 <= r <= min(in, out)."""
    if isinstance(spec, BudgetAllocation):
        ranks = _scale_to_budget(spec.shape(sites), sites, spec.params)
    else:
        ranks = [_round(x) for x in spec.shape(sites)]
    for site, rank in zip(sites, ranks):
        cap = min(site.in_features, site.out_features)
        if not 1 <= rank <= cap:
            raise PeftlabError(
                f"plan.allocation: rank {rank} at {site.key} (layer {site.layer}, {site.role}) is invalid; "
                f"it must be between 1 and min(in, out) = {cap}"
            )
    return ranks


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up, not banker's rounding


def _scale_to_budget(shape: list[float], sites: Sequence[Site], target: int) -> list[int]:
    caps = [min(s.in_features, s.out_features) for s in sites]
    costs = [s.in_features + s.out_features for s in sites]

    def ranks_at(scale: float) -> list[int]:
        return [min(cap, max(1, _round(scale * w))) for w, cap in zip(shape, caps)]

    def params_at(scale: float) -> int:
        return sum(r * c for r, c in zip(ranks_at(scale), costs))

    floor_params, ceiling_params = sum(costs), sum(c * k for c, k in zip(costs, caps))
    if target < floor_params:
        raise PeftlabError(
            f"plan.allocation.params: budget {target:,} is below the smallest plan on these sites "
            f"({floor_params:,} trainable parameters at rank 1 everywhere)"
        )
    if target > ceiling_params:
        raise PeftlabError(
            f"plan.allocation.params: budget {target:,} exceeds the largest plan on these sites "
            f"({ceiling_params:,} at full rank everywhere)"
        )
    if max(shape) <= 0:
        raise PeftlabError("plan.allocation.shape: every site has weight 0")
    lo, hi = 0.0, 1.0
    while params_at(hi) <= target:
        hi *= 2
    for _ in range(100):  # params_at is a non-decreasing step function of the scale
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params_at(mid) <= target else (lo, mid)
    below, above = ranks_at(lo), ranks_at(hi)
    return min((below, above), key=lambda r: abs(sum(x * c for x, c in zip(r, costs)) - target))


def read_scores(path: Path) -> dict[tuple[Any, ...], float]:
    """Per-site scores keyed by (layer, role) and by (path,)."""
    require_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PeftlabError(f"{path}: cannot read scores: {exc}") from None
    try:
        if path.suffix.lower() == ".csv":
            rows: list[dict[str, Any]] = list(csv.DictReader(text.splitlines()))
        else:
            data = json.loads(text)
            rows = data["sites"] if isinstance(data, dict) else data
    except (json.JSONDecodeError, KeyError, TypeError, csv.Error, RecursionError) as exc:
        raise PeftlabError(f"{path}: not a scores file (JSON list or {{'sites': [...]}}, or CSV): {exc}") from None
    scores: dict[tuple[Any, ...], float] = {}
    if not isinstance(rows, list):
        raise PeftlabError(f"{path}: not a scores file: expected a list of sites (JSON list or {{'sites': [...]}}, or CSV)")
    for i, row in enumerate(rows, start=1):
        try:
            if not isinstance(row, dict):
                raise TypeError(f"expected an object, got {type(row).__name__}")
            score = float(row["score"])
            if not (math.isfinite(score) and score >= 0):
                raise ValueError(f"score must be finite and >= 0, got {row['score']!r}")
            if row.get("path"):
                scores[(str(row["path"]),)] = score
            if row.get("layer") not in (None, "") and row.get("role"):
                scores[(int(row["layer"]), parse_role(str(row["role"])))] = score
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            raise PeftlabError(f"{path}: row {i}: needs layer+role or path, and a score >= 0 ({exc})") from None
    return scores


def _score_for(site: Site, scores: dict[tuple[Any, ...], float], path: Path) -> float:
    for key in ((site.key,), (site.layer, site.role)):
        if key in scores:
            return scores[key]
    parts = FUSED_PARTS.get(site.role, ())
    if parts and all((site.layer, r) in scores for r in parts):  # a fused module adapted whole: its parts' mean
        return sum(scores[(site.layer, r)] for r in parts) / len(parts)
    raise PeftlabError(f"{path}: no score for layer {site.layer} {site.role} ({site.path})")


# Compact form: `uniform(8)`, `linear(16->4)`, `attention-heavy(8)`, `role-weighted(8, attn=2, ffn=1)`,
# `budget(100000, linear(16->4))`, `from-scores(scores.json, min=2, max=32)`, `importance(fisher, steps=32)`.
_CALL = re.compile(r"\s*([a-z][a-z-]*)\s*(?:\((.*)\))?\s*", re.S)


def parse_allocation(text: str | int) -> dict[str, Any]:
    """Compact allocation text -> the dict its spec validates. Raises ValueError with what is valid."""
    if isinstance(text, int):
        return {"kind": "uniform", "rank": text}
    if re.fullmatch(r"\s*\d+\s*", text):
        return {"kind": "uniform", "rank": int(text)}
    m = _CALL.fullmatch(text)
    valid = ", ".join([*ALLOCATIONS, *ROLE_WEIGHT_PRESETS])
    if not m:
        raise ValueError(f"cannot parse allocation {text!r}; valid: {valid}, e.g. linear(16->4)")
    name, arg_text = m.group(1), m.group(2) or ""
    data: dict[str, Any] = {}
    if name in ROLE_WEIGHT_PRESETS:
        name, data["weights"] = "role-weighted", dict(ROLE_WEIGHT_PRESETS[name])
    if name not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {name!r}; valid: {valid}")
    cls = ALLOCATIONS[name]
    data["kind"] = name
    args = _split_args(arg_text)
    positional = [a for a in args if "=" not in a or "(" in a.split("=", 1)[0]]
    if len(positional) > len(cls.positional):
        raise ValueError(f"{name} takes {len(cls.positional)} positional argument(s) ({', '.join(cls.positional)}), got {len(positional)}")
    for field, value in zip(cls.positional, positional):
        data[field] = _value(value)
    for arg in args:
        if arg in positional:
            continue
        key, value = (s.strip() for s in arg.split("=", 1))
        if key in cls.model_fields or key == "shape":
            data[key] = _value(value)
        elif cls is RoleWeightedAllocation:
            data.setdefault("weights", {})[key] = float(value)
        else:
            raise ValueError(f"{name} has no argument {key!r}; it takes {', '.join(cls.positional) or 'none'}")
    return data


def _split_args(text: str) -> list[str]:
    """Split on top-level commas and `->`."""
    parts, depth, current = [], 0, ""
    text = text.replace("->", ",")
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
