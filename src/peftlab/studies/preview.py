"""What each configuration of a study will train, resolved before anything runs: the sites, ranks and
trainable parameters of its plan (on the meta device, no weights loaded). `study run` prints it, and
`study run --dry-run` prints it and stops, so that a user sees the experiment before paying for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.files import file_problem
from peftlab.records.halving import point_of
from peftlab.specs import MAX_LR, RunConfig, StudySpec
from peftlab.studies.grid import configurations, planned_run, tuning_points


@dataclass(frozen=True)
class ConfigurationPreview:
    label: str
    seeds: list[int]
    method: str
    what: str  # the resolved plan in one line, or why the configuration is invalid
    trainable: int | None  # adapter parameters (head excluded); None where only a run can tell
    valid: bool
    rates: list[float] = field(default_factory=list)  # the learning rates it tries on validation first, if tuned
    points: list[tuple] = field(default_factory=list)  # the points it tries (a rate, with a grid's or sample's values)


def check_grid(spec: StudySpec) -> None:
    """Each path of `tune.grid` (or `tune.sample.space`) names one setting that a run's config holds as the value
    set (the study reads a tuning run's point back from its config); one line naming the path otherwise."""
    if spec.tune is None or not spec.tune.paths:
        return
    for configuration in configurations(spec):
        points = tuning_points(spec, configuration)
        run = planned_run(spec, configuration, spec.tune.seeds[0], points[0], "tune") if points else None
        if run is None or run.error:
            continue  # the preview names the invalid configuration
        for path, wanted, held in zip(spec.tune.paths, points[0][1:], point_of(run.config, spec.tune)[1:]):
            if isinstance(held, (dict, list)) or held != wanted:
                where = "tune.grid" if spec.tune.sample is None else "tune.sample.space"
                raise PeftlabError(f"{where}: {path}: a run's config holds {held!r} there, not the value {wanted!r}; "
                                   "name the single setting (e.g. plan.alpha.value, not plan.alpha)")
        return


def preview(spec: StudySpec) -> list[ConfigurationPreview]:
    """One line per configuration, in the study's order."""
    check_grid(spec)
    out = []
    read: dict[Path, str | None] = {}  # each data file is read once
    for configuration in configurations(spec):
        run = planned_run(spec, configuration, spec.seeds[0])
        points = tuning_points(spec, configuration) if spec.tune is not None else []
        rates = sorted({point[0] for point in points})
        line = partial(ConfigurationPreview, run.label, spec.seeds, rates=rates, points=points)
        if rates and max(rates) > MAX_LR:
            out.append(line("?", f"tune.lr_factors: the rate {max(rates):g} is above {MAX_LR:g}, the largest an "
                                 "optimizer takes in float32", None, False))
            continue
        if run.error:
            out.append(line("?", run.error, None, False))
            continue
        config = RunConfig.model_validate(run.config)
        missing = _missing_file(config) or _unreadable_data(config, read)
        if missing:
            out.append(line(config.method.label, missing, None, False))
            continue
        try:
            what, trainable = describe(config)
        except PeftlabError as exc:
            out.append(line(config.method.label, str(exc), None, False))
            continue
        out.append(line(config.method.label, what, trainable, True))
    return out


def check_configurations(spec: StudySpec) -> list[ConfigurationPreview]:
    """Every configuration of `spec` is valid and its files exist, or one error that lists each invalid one
    (before a study writes or runs anything). Returns the previews."""
    previews = preview(spec)
    invalid = [p for p in previews if not p.valid]
    if invalid and len(invalid) == len(previews) > 1 and len({p.what for p in invalid}) == 1:
        raise PeftlabError(f"study {spec.name}: every configuration is invalid, so nothing was run: {invalid[0].what}")
    if invalid:
        listed = "; ".join(p.what if p.label in p.what else f"{spec.name} [{p.label}]: {p.what}" for p in invalid)
        raise PeftlabError(f"study {spec.name}: {len(invalid)} of {len(previews)} configurations are invalid, so "
                           f"nothing was run: {listed}")
    return previews


def _missing_file(config: RunConfig) -> str | None:
    """The first input file a run of `config` would read that is not a regular file (missing, a directory,
    a FIFO, a device), and why."""
    allocation = config.plan.allocation
    files = {"task.path": config.task.path, "task.test_path": config.task.test_path,
             "eval.forgetting.path": config.eval.forgetting.path if config.eval.forgetting else None,
             "plan.allocation.path": getattr(getattr(allocation, "shape_", allocation), "path", None)}
    for name, path in files.items():
        if path is not None and (problem := file_problem(path)) is not None:
            return f"{name}: {path}: {problem}"
    return None


def _unreadable_data(config: RunConfig, read: dict[Path, str | None]) -> str | None:
    """Why a task file cannot give rows (empty, malformed, no rows), read once per file: a study refuses it
    instead of failing each of its runs."""
    from peftlab.tasks.data import read_records

    for path in (config.task.path, config.task.test_path):
        if path is None:
            continue
        if path not in read:
            try:
                read_records(path)
                read[path] = None
            except PeftlabError as exc:
                read[path] = str(exc)
        if read[path] is not None:
            return read[path]
    return None


def describe(config: RunConfig) -> tuple[str, int | None]:
    """(one line, trainable adapter parameters) for `config`'s plan and method."""
    from peftlab.methods.registry import make_method
    from peftlab.plans.plan import plan_on
    from peftlab.resolve.budget import match_budget, method_params
    from peftlab.tasks.kinds import task_kind

    model = config.model
    task_kind(config.task.resolved_kind).check_model(model)
    allocation = config.plan.allocation
    shape = getattr(allocation, "shape_", allocation)
    if shape.kind == "importance":  # needs the probe, which runs on the model's weights and data
        target = f", scaled to {allocation.params:,} parameters" if allocation.kind == "budget" else ""
        return f"ranks from an importance probe ({shape.measure}) when the first run starts{target}", None
    sized, chosen = config, ""
    if config.budget:
        sized, match = match_budget(config, model, config.budget)
        chosen = f"; budget {config.budget:,}: {match.parameter} {match.size}" if match.size else ""
    trainable = method_params(sized, model)
    method = make_method(config.method)
    if method.size_parameter != "rank":
        return f"{method.label}{chosen}: {trainable:,} trainable", trainable
    plan = plan_on(model, sized.plan)
    make_method(sized.method).check_plan(plan)
    return f"{summarize_plan(plan)}{chosen}; {trainable:,} trainable", trainable


def summarize_plan(plan) -> str:
    """e.g. `24 sites: q, v in layers 3-5, rank 8 (alpha 16)`."""
    roles = list(dict.fromkeys(p.site.role.value for p in plan.sites))
    layers = sorted({p.site.layer for p in plan.sites})
    ranks = sorted({p.rank for p in plan.sites})
    alphas = sorted({p.alpha for p in plan.sites})
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    alpha = f"alpha {alphas[0]:g}" if len(alphas) == 1 else f"alpha {alphas[0]:g}-{alphas[-1]:g}"
    return f"{len(plan.sites)} sites: {', '.join(roles)} in layers {_ranges(layers)}, {rank} ({alpha})"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> `0-2, 5`."""
    parts, start = [], None
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)
