"""A study spec -> its runs: the product of the axes, times the seeds. A run's id is a hash of its
resolved config, so equal configurations are one run however they were written.

With a `tune:` block, each configuration first has tuning runs (phase `tune`: every rate of the grid x
the tuning seeds); its seed runs (phase `main`) exist once a rate has been chosen for it from the tuning
runs' validation metrics (`studies.tuning`), and train at that rate."""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from peftlab.config import set_dotted, validate
from peftlab.errors import PeftlabError
from peftlab.fields import identity_view
from peftlab.methods.registry import METHODS
from peftlab.specs import AXIS_PATHS, RunConfig, StudySpec, config_id


@dataclass(frozen=True)
class PlannedRun:
    id: str
    group: str  # the configuration without its seed: runs of one group differ only by seed
    label: str  # e.g. "placement=attention"
    seed: int
    axes: dict[str, str]  # axis -> value name (tuning runs add "lr")
    config: dict[str, Any]  # the resolved run config, or the raw one when it is invalid
    error: str | None = None  # why the config is invalid (the run is recorded as failed)
    phase: str = "main"  # main: a result of the study; tune: a learning-rate trial on validation


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


@dataclass(frozen=True)
class Configuration:
    label: str
    axes: dict[str, str]
    data: dict[str, Any]  # the base with this combination's axis values set (no seed)
    error: str | None  # why setting the axes failed


def configurations(spec: StudySpec) -> list[Configuration]:
    """The product of the axes: one configuration per combination of axis values."""
    axes = [(axis, _named_values(values)) for axis, values in spec.axes.items()]
    out = []
    for combination in itertools.product(*(values for _, values in axes)):
        names = {axis: name for (axis, _), (name, _) in zip(axes, combination)}
        label = ", ".join(f"{axis}={name}" for axis, name in names.items()) or spec.name
        data, error = copy.deepcopy(spec.base), None
        try:
            for (axis, _), (_, value) in zip(axes, combination):
                settings = value.items() if axis == "variant" else [(axis, value)]
                for key, setting in settings:
                    set_dotted(RunConfig, data, _axis_path(key, setting), copy.deepcopy(setting), _source(spec, label))
        except PeftlabError as exc:
            error = str(exc)
        out.append(Configuration(label, names, data, error))
    return out


def _source(spec: StudySpec, label: str) -> str:
    return f"{spec.name} [{label}]"


def planned_run(spec: StudySpec, configuration: Configuration, seed: int, point: tuple[Any, ...] | None = None,
                phase: str = "main", error: str | None = None) -> PlannedRun:
    """One run of `configuration` at `seed` (and at the tuning `point`: its rate, then the values of `tune.paths`),
    validated; invalid ones carry their error."""
    source = _source(spec, configuration.label)
    data = copy.deepcopy(configuration.data)
    settings = spec.tune.settings(point) if point is not None else {}
    axes = dict(configuration.axes) if phase == "main" else {
        **configuration.axes, "lr": f"{point[0]:g}", **{k: str(v) for k, v in settings.items() if k != "train.lr"}}
    error = error or configuration.error
    config: dict[str, Any] = data
    try:  # the seed is set even in an invalid config: each seed is its own (failed) run
        set_dotted(RunConfig, data, "train.seed", seed, source)
        for path, value in settings.items():
            set_dotted(RunConfig, data, path, value, source)
        if phase == "main" and _train_setting(data, "eval_at") is None:  # where each run was still improving
            set_dotted(RunConfig, data, "train.eval_at", list(STUDY_EVAL_AT), source)
        if phase == "tune":  # judged on validation alone: no test evaluation, no latency timing
            set_dotted(RunConfig, data, "train.evaluate_test", False, source)
            set_dotted(RunConfig, data, "train.latency_batches", 0, source)
        if error is None:
            config = validate(RunConfig, data, source).model_dump(mode="json", by_alias=True)
            if phase == "tune" and spec.tune.rungs and METHODS[config["method"]["name"]].resumable:
                config["train"]["stop_at"] = spec.tune.rungs[0]  # successive halving (`records.halving`)
    except PeftlabError as exc:
        error = error or str(exc)
    if error is None and config.get("tracking"):  # each run named and tagged so that trackers line runs up
        tracking = config["tracking"]
        tracking["run_name"] = f"{tracking['run_name'] or spec.name}/{configuration.label}/seed {seed}" + (
            f" {'' if spec.tune.beyond_the_rate else 'lr '}{spec.tune.describe(point)} (tuning)" if phase == "tune" else "")
        tracking["tags"] = {**tracking["tags"], "study": spec.name, "configuration": configuration.label,
                            "seed": str(seed), "phase": phase}
    learned = learned_config(config)
    unseeded = copy.deepcopy(learned)
    if isinstance(unseeded.get("train"), dict):
        unseeded["train"].pop("seed", None)
    return PlannedRun(config_id(learned), config_id(unseeded), configuration.label, seed, axes, config, error, phase)


STUDY_EVAL_AT = (0.75,)  # a study's seed runs also evaluate validation here (convergence, in the report: the last
# quarter's change; each look costs a validation pass, so no other)


def _train_setting(data: dict[str, Any], name: str) -> Any:
    train = data.get("train")
    return train.get(name) if isinstance(train, dict) else None


def learned_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a dumped RunConfig, or the raw one of an invalid run) as its id hashes it: without the fields
    marked as not changing what a run learns, or as added later while they hold the default they came with
    (`peftlab.fields`)."""
    return identity_view(RunConfig, config)


def tuning_points(spec: StudySpec, configuration: Configuration) -> list[tuple[Any, ...]]:
    """The points `configuration` tries: each rate with every combination of `tune.grid`, or the points
    `tune.sample` draws (the same for every configuration)."""
    own = _own_rate(spec, configuration)
    return [] if own is None else spec.tune.points(own)


def _own_rate(spec: StudySpec, configuration: Configuration) -> float | None:
    """The configuration's own train.lr where `tune.lr_factors` needs it (nan where not); None where it is invalid
    (its seed runs record why)."""
    if spec.tune.lr_factors is None:
        return math.nan  # the same grid (or drawn points) for every configuration
    if configuration.error:
        return None
    try:
        return validate(RunConfig, configuration.data, _source(spec, configuration.label)).train.lr
    except PeftlabError:
        return None


def expand(spec: StudySpec, chosen: dict[str, float | str] | None = None,
           counts: dict[str, int] | None = None) -> list[PlannedRun]:
    """Every run of the study known so far. With tuning, `chosen` maps a configuration's label to its chosen
    point (its rate and the values of `tune.paths`; or why none could be chosen); configurations not in it have only
    their tuning runs yet. With seeds until resolved, `counts` maps a label to the seeds it has reached
    (`studies.adaptive`)."""
    runs: dict[str, PlannedRun] = {}
    for configuration in configurations(spec):
        point, error = None, None
        if spec.tune is not None:
            for tried in tuning_points(spec, configuration):
                for seed in spec.tune.seeds:
                    run = planned_run(spec, configuration, seed, tried, "tune")
                    runs.setdefault(run.id, run)
            if configuration.label not in (chosen or {}):
                continue
            point = chosen[configuration.label]
            if isinstance(point, str):  # no point could be chosen: the seed runs record why
                point, error = None, point
        for seed in seeds_of(spec, (counts or {}).get(configuration.label, len(spec.seeds))):
            run = planned_run(spec, configuration, seed, point, error=error)
            runs.setdefault(run.id, run)
    return list(runs.values())


def seeds_of(spec: StudySpec, n: int) -> list[int]:
    """The first `n` seeds of a configuration: the spec's, then max + 1, max + 2, ... (seeds until resolved)."""
    extra = max(spec.seeds) + 1
    return [*spec.seeds, *range(extra, extra + max(0, n - len(spec.seeds)))]


def with_base_overrides(spec: StudySpec, data: Path | None, settings: list[str]) -> StudySpec:
    """`spec` with its base run config trained on `data` (the task's other settings kept) and each
    KEY=VALUE of `settings` set (VALUE read as YAML), for `study run --data/--set`. A KEY in STUDY_SETTINGS
    sets that field of the study; any other is a dotted path into the base run config. The description
    records the changes."""
    if data is None and not settings:
        return spec
    study = spec.model_dump(mode="json", exclude={"base"})
    base = copy.deepcopy(spec.base)
    if data is not None:
        kind = validate(RunConfig, {"task": base.get("task")} if base.get("task") else {}, "study base").task.resolved_kind
        set_dotted(RunConfig, base, "task.kind", kind, "--data")
        for source in ("name", "dataset", "test_path"):
            base["task"].pop(source, None)
        base["task"]["path"] = str(data)
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or not key.strip():
            raise PeftlabError(f"--set {setting!r}: use KEY=VALUE, e.g. task.max_train_examples=2000")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise PeftlabError(f"--set {setting!r}: VALUE is not valid YAML") from None
        key = key.strip()
        if key in STUDY_SETTINGS:
            study[key] = parsed
        else:
            set_dotted(RunConfig, base, key, parsed, "--set")
    # the report states how this study departs from the spec it was written from
    changes = ([f"--data {data}"] if data is not None else []) + [f"--set {s}" for s in settings]
    note = f"Changed from its spec by: {'; '.join(changes)}."
    if note not in (study.get("description") or ""):
        study["description"] = f"{(study.get('description') or '').rstrip()} {note}".strip()
    return validate(StudySpec, {**study, "base": base}, "study (after --data/--set)")


STUDY_SETTINGS = ("seeds", "metric", "margin", "until_resolved", "tune", "description", "references")  # `--set` keys of the study itself
