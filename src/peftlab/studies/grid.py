"""A study spec -> its runs: the product of the axes, times the seeds. A run's id is a hash of its
resolved config, so equal configurations are one run however they were written."""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from typing import Any

from peftlab.config import (
    AXIS_PATHS,
    RunConfig,
    StudySpec,
    config_id,
    set_dotted,
    validate,
)
from peftlab.errors import PeftlabError


@dataclass(frozen=True)
class PlannedRun:
    id: str
    group: str  # the configuration without its seed: runs of one group differ only by seed
    label: str  # e.g. "placement=attention"
    seed: int
    axes: dict[str, str]  # axis -> value name
    config: dict[str, Any]  # the resolved run config, or the raw one when it is invalid
    error: str | None = None  # why the config is invalid (the run is recorded as failed)


def _named_values(values: dict[str, Any] | list[Any]) -> list[tuple[str, Any]]:
    if isinstance(values, dict):
        return [(str(name), value) for name, value in values.items()]
    return [(v if isinstance(v, str) else json.dumps(v, sort_keys=True), v) for v in values]


def _axis_path(axis: str, value: Any) -> str:
    """The dotted path an axis value sets. `rank` with a number sets the base rank of the allocation in
    `base` (keeping its shape); with text such as `uniform(4)` it is a whole allocation."""
    if axis == "rank" and not isinstance(value, int):
        return AXIS_PATHS["allocation"]
    return AXIS_PATHS.get(axis, axis)


def expand(spec: StudySpec) -> list[PlannedRun]:
    axes = [(axis, _named_values(values)) for axis, values in spec.axes.items()]
    runs: dict[str, PlannedRun] = {}
    for combination in itertools.product(*(values for _, values in axes)):
        names = {axis: name for (axis, _), (name, _) in zip(axes, combination)}
        label = ", ".join(f"{axis}={name}" for axis, name in names.items()) or spec.name
        source = f"{spec.name} [{label}]"
        for seed in spec.seeds:
            data = copy.deepcopy(spec.base)
            try:
                for (axis, _), (_, value) in zip(axes, combination):
                    settings = value.items() if axis == "variant" else [(axis, value)]
                    for key, setting in settings:
                        set_dotted(RunConfig, data, _axis_path(key, setting), copy.deepcopy(setting), source)
                set_dotted(RunConfig, data, "train.seed", seed, source)
                config = validate(RunConfig, data, source).model_dump(mode="json", by_alias=True)
                error = None
            except PeftlabError as exc:
                config, error = data, str(exc)
            unseeded = copy.deepcopy(config)
            unseeded.get("train", {}).pop("seed", None)
            run = PlannedRun(config_id(config), config_id(unseeded), label, seed, names, config, error)
            runs.setdefault(run.id, run)
    return list(runs.values())
