"""A study's runs -> per-configuration statistics, comparisons with a baseline, the Pareto
frontier, recommendations and the study's limits. Everything the report shows is computed here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab import measures
from peftlab.analysis.futility import paired_differences, with_futility
from peftlab.analysis.pareto import pareto_front
from peftlab.analysis.provenance import provenance_lines
from peftlab.analysis.references import ReferenceRow, reference_rows
from peftlab.analysis.sequential import FIXED, Design, study_design
from peftlab.analysis.stats import (
    BOOTSTRAP_MIN_SEEDS,
    CONSTANT,
    Comparison,
    Summary,
    Verdict,
    compare,
    judge,
    not_trained,
    summarize,
)
from peftlab.errors import PeftlabError
from peftlab.measures import COST_BY_NAME, COSTS, format_p
from peftlab.records.degenerate import blind, checkable, degenerate_reason
from peftlab.records.halving import tuning_steps
from peftlab.records.results import Snapshot, default_baseline, primary_metric
from peftlab.records.store import open_existing, run_dir
from peftlab.records.tuning import RateChoice, not_run, rate_choices
from peftlab.specs import TuneSpec
from peftlab.train.result import read_samples

SAMPLES_SHOWN = 3  # generated completions shown per configuration in the report


@dataclass(frozen=True)
class Improvement:
    """The mean change of a validation metric over the last stretch of training (in the better direction)."""

    metric: str  # e.g. validation accuracy
    since: float  # the fraction of the steps the stretch starts at (e.g. 0.75)
    change: float  # mean over the runs, positive = still improving
    runs: int
    margin: float  # what counts as still improving

    @property
    def still_improving(self) -> bool:
        return self.change > self.margin


@dataclass
class Configuration:
    group: str
    label: str
    config: dict[str, Any]
    runs: list[dict[str, Any]]  # done runs (flat rows)
    quality: dict[int, float]  # seed -> primary metric
    summary: Summary
    costs: dict[str, Summary]
    every_metric: dict[str, Summary] = field(default_factory=dict)  # every numeric metrics.* and cost.* column
    on_front: bool = False
    comparison: Comparison | None = None
    p_holm: float = math.nan  # the sequential p-value (the plain one with one look), Holm-corrected
    verdict: Verdict | None = None
    degenerate: dict[int, str] = field(default_factory=dict)  # seed -> why that run is degenerate
    improvement: Improvement | None = None  # how much validation quality still rose at the end of training

    @property
    def seeds_run(self) -> int:
        """Its finished runs, degenerate ones included (left out of `runs` with --exclude-degenerate)."""
        return len({r["seed"] for r in self.runs} | set(self.degenerate))

    @property
    def trained(self) -> bool:
        """Whether any of its runs learned something (a configuration whose runs are all degenerate did not)."""
        return not self.degenerate or any(r["seed"] not in self.degenerate for r in self.runs)


@dataclass(frozen=True)
class NotRun:
    """A configuration without seed runs: every tuning run collapsed on validation (`records.tuning.not_run`)."""

    label: str
    verdict: Verdict  # no verdict, and why
    trainable: float | None  # its trainable and base parameters, from its tuning runs
    base: float | None


@dataclass
class Analysis:
    name: str
    description: str
    metric: str
    higher_is_better: bool
    cost: str
    test: str
    configurations: list[Configuration]
    baseline: Configuration
    failed: int
    interval: str = "t"  # t | bootstrap: how the configurations' confidence intervals were computed
    margin: float = math.nan  # the equivalence margin of the verdicts, in metric units
    exclude_degenerate: bool = False  # degenerate runs left out of the statistics (else included and named)
    count_degenerate: bool = False  # a configuration whose runs are all degenerate still gets a verdict
    tuning: dict[str, RateChoice] = field(default_factory=dict)  # label -> its learning-rate choice
    tuning_steps: tuple[int, int] | None = None  # (steps tuning trained, steps it would to the end): halving
    design: Design = FIXED  # the looks and level of the tests (several looks: seeds until resolved)
    recommendations: list[str] = field(default_factory=list)
    limits: list[str] = field(default_factory=list)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # label -> completions of its first seed
    provenance: list[str] = field(default_factory=list)  # versions, device and inputs of the compared runs
    references: list[ReferenceRow] = field(default_factory=list)  # published results beside the study's
    not_run: list[NotRun] = field(default_factory=list)  # configurations that got no seed runs (no verdict)
    study_dir: Path | None = None  # where its runs are (the figures read their plans and training curves)


def choose_baseline(configurations: list[Configuration], label: str | None, skipped: dict[str, str] | None = None
                    ) -> Configuration:
    """The named configuration, else the study's all-placement / uniform-rank LoRA (smallest rank). `skipped`:
    configurations without seed runs (label -> how their tuning runs collapsed), named when `label` is one."""
    if label is not None:
        for c in configurations:
            if c.label == label or c.label.split("=", 1)[-1] == label:
                return c
        missing = next((f" ({name} has none: every tuning run {how} on validation)" for name, how in (skipped or {}).items()
                        if label in (name, name.split("=", 1)[-1])), "")
        raise PeftlabError(f"--baseline {label!r}: no such configuration with seed runs{missing}; valid: "
                           f"{', '.join(c.label for c in configurations)}")
    chosen = default_baseline({c.label: c.config for c in configurations})
    return next(c for c in configurations if c.label == chosen)


def _known_metric(given: str, rows: list[dict[str, Any]]) -> str:
    """`given` as a dotted metric of the study's finished runs (`accuracy` -> metrics.test.accuracy, or a dotted
    column such as metrics.benchmarks.arc_easy.acc); one line listing the valid names when no finished run has it
    (before any run has finished, any name passes)."""
    metric = given if given.startswith("metrics.") else f"metrics.test.{given}"
    done = [r for r in rows if r["status"] == "done" and r["phase"] == "main"]
    if not done or any(r.get(metric) is not None for r in done):
        return metric
    valid = sorted({key.removeprefix("metrics.test.") for r in done for key, value in r.items()
                    if key.startswith(("metrics.test.", "metrics.benchmarks.")) and not key.endswith("_stderr")
                    and isinstance(value, (int, float)) and not isinstance(value, bool) and key != "metrics.test.count"})
    raise PeftlabError(f"--metric {given!r}: not a metric of this study's runs; valid: {', '.join(valid)}")


def analyze(study_dir: Path, metric: str | None = None, cost: str = "trainable", baseline: str | None = None,
            test: str = "t", interval: str = "t", margin: float | None = None,
            exclude_degenerate: bool = False, count_degenerate: bool = False, verdicts_only: bool = False) -> Analysis:
    """The study's analysis, from its store and spec. `verdicts_only`: the verdicts' outcomes and nothing the report
    adds (power figures, recommendations, limits, samples), for deciding which seeds to add after each look."""
    check_options(test, interval, margin)
    store = open_existing(study_dir)
    try:
        snapshot = Snapshot.of(store)
    finally:
        store.close()
    return analyze_snapshot(snapshot, _read_spec(study_dir), study_dir, metric, cost, baseline, test, interval, margin,
                            exclude_degenerate, count_degenerate, verdicts_only)


def check_options(test: str, interval: str, margin: float | None) -> None:
    """One line for a test, interval or margin the analysis does not know."""
    if test not in ("t", "wilcoxon"):
        raise PeftlabError(f"--test {test!r}: valid tests are t and wilcoxon")
    if interval not in ("t", "bootstrap"):
        raise PeftlabError(f"--interval {interval!r}: valid intervals are t and bootstrap")
    if margin is not None and not (isinstance(margin, (int, float)) and margin > 0 and math.isfinite(margin)):
        raise PeftlabError(f"--margin {margin}: must be a positive difference in the metric's units, e.g. 0.01")


def analyze_snapshot(snapshot: Snapshot, spec: dict[str, Any], study_dir: Path, metric: str | None = None,
                     cost: str = "trainable", baseline: str | None = None, test: str = "t", interval: str = "t",
                     margin: float | None = None, exclude_degenerate: bool = False, count_degenerate: bool = False,
                     verdicts_only: bool = False) -> Analysis:
    """`analyze` of the stored runs `snapshot` and the study's `spec` (as study.yaml holds it); `study_dir` is read
    only for the report's samples (not with `verdicts_only`)."""
    rows, configs, current = snapshot.rows, snapshot.configs, snapshot.current
    tune = TuneSpec.model_validate(spec["tune"]) if spec.get("tune") else None
    tuning = rate_choices(snapshot, tune)
    metric = metric or spec.get("metric")
    metric = primary_metric(rows)[0] if metric is None else _known_metric(metric, rows)
    higher = measures.higher_is_better(metric)
    if cost not in COST_BY_NAME:
        raise PeftlabError(f"--cost {cost!r}: valid costs are {', '.join(COST_BY_NAME)}")
    done = [r for r in rows if r["status"] == "done" and r["phase"] == "main" and r.get(metric) is not None
            and current.get(r["label"]) == r["group"]]
    if not done:
        raise PeftlabError(f"{study_dir}: no finished run has {metric}; run the study first")
    configurations = _configurations(done, configs, metric, interval, exclude_degenerate)
    if not configurations:
        raise PeftlabError(f"{study_dir}: every finished run is degenerate; nothing is left to compare without them")
    configurations.sort(key=lambda c: (c.costs[cost].mean, c.label))
    seeded = {r["label"] for r in done}  # a label with seed runs from before is compared as it is
    skipped = {label: how for label, how in not_run(snapshot, tuning).items() if label not in seeded}
    chosen = choose_baseline(configurations, baseline, skipped)
    others = [c for c in configurations if c is not chosen]
    for c in others:
        c.comparison = compare(c.quality, chosen.quality, test)
    margin = margin or spec.get("margin") or measures.default_margin(metric, chosen.summary.mean)
    design = _design(spec, study_dir)
    _judge(chosen, others, margin, higher, design, count_degenerate, tuning, power_figures=not verdicts_only)
    front = pareto_front([c.costs[cost].mean for c in configurations], [c.summary.mean for c in configurations], higher)
    for c, on in zip(configurations, front):
        c.on_front = on
    analysis = Analysis(spec.get("name", study_dir.name), spec.get("description", ""), metric, higher, cost, test,
                        configurations, chosen, sum(r["status"] == "failed" for r in rows), interval, margin,
                        exclude_degenerate, design=design)
    analysis.count_degenerate, analysis.study_dir = count_degenerate, study_dir
    analysis.tuning, analysis.tuning_steps = tuning, tuning_steps(snapshot)
    analysis.not_run = [_not_run(label, how, tuning[label], rows, margin) for label, how in skipped.items()]
    if not verdicts_only:
        _add_report_findings(analysis, rows, study_dir)
        analysis.references = reference_rows(analysis, spec.get("references") or {})
    return analysis


def _configurations(done: list[dict[str, Any]], configs: dict[str, Any], metric: str, interval: str,
                    exclude_degenerate: bool) -> list[Configuration]:
    """One per group of finished runs, with its quality, costs and every numeric column summarized; degenerate
    runs flagged (and left out with `exclude_degenerate`)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in done:
        groups.setdefault(row["group"], []).append(row)
    cost_columns = {**{c.name: f"cost.{c.column}" for c in COSTS}, "base": "cost.base_params", "total": "cost.total_params"}
    configurations = []
    for group, every_run in groups.items():
        benchmark = metric.split(".")[2] if metric.startswith("metrics.benchmarks.") else None
        flagged = {r["seed"]: reason for r in every_run if (reason := degenerate_reason(r, benchmark=benchmark))}
        runs = [r for r in every_run if r["seed"] not in flagged] if exclude_degenerate else every_run
        if not runs:  # every run of this configuration is degenerate and left out
            continue
        quality = {r["seed"]: r[metric] for r in runs}
        costs = {name: summarize([r[column] for r in runs if r.get(column) is not None], method=interval)
                 for name, column in cost_columns.items()}
        numeric = sorted({k for r in runs for k, v in r.items() if k.startswith(("metrics.", "cost."))
                          and isinstance(v, (int, float)) and not isinstance(v, bool)})
        every = {k: summarize([r[k] for r in runs if isinstance(r.get(k), (int, float))], method=interval) for k in numeric}
        configurations.append(Configuration(group, runs[0]["label"], configs[runs[0]["id"]], runs, quality,
                                            summarize(list(quality.values()), method=interval), costs, every,
                                            degenerate=flagged))
    return configurations


def _judge(chosen: Configuration, others: list[Configuration], margin: float, higher: bool, design: Design,
           count_degenerate: bool, tuning: dict[str, RateChoice], power_figures: bool) -> None:
    """Each comparison's verdict; a configuration that never trained (or against a baseline that never did) gets
    none unless `count_degenerate`."""
    judged = [c for c in others if count_degenerate or (c.trained and chosen.trained)]
    # the pooled spread of the equivalence tests: from comparisons without degenerate runs (where there are any)
    clean = [not c.degenerate and not chosen.degenerate for c in judged]
    verdicts = judge([c.comparison for c in judged], margin, higher, design, power_figures=power_figures,
                     pooled_from=clean if any(clean) else None)
    for c, v in zip(judged, verdicts):  # an unresolved one with no chance worth more seeds says so
        c.p_holm, c.verdict = v.p, with_futility(v, paired_differences(c.quality, chosen.quality), design)
    for c in others:
        if c not in judged:
            reason = _not_trained_reason(c, tuning) if not c.trained else _not_trained_reason(chosen, tuning, True)
            c.verdict = not_trained(margin, reason)


def _add_report_findings(analysis: Analysis, rows: list[dict[str, Any]], study_dir: Path) -> None:
    """What the report adds to the verdicts: recommendations, convergence, limits, provenance, samples."""
    analysis.recommendations = recommend(analysis)
    for c in analysis.configurations:
        c.improvement = improvement(c.runs, analysis.metric, analysis.higher_is_better, analysis.margin)
    analysis.limits = limits(analysis, rows)
    analysis.provenance = provenance_lines([r for c in analysis.configurations for r in c.runs])
    for c in analysis.configurations:
        first = min(c.runs, key=lambda r: r["seed"])
        if shown := read_samples(run_dir(study_dir, first["id"]), SAMPLES_SHOWN):
            analysis.samples[c.label] = shown


def improvement(runs: list[dict[str, Any]], metric: str, higher: bool, margin: float) -> Improvement | None:
    """The mean change of the validation metric (the quality metric where validation has it, else the loss at
    the loss margin) from the last intermediate evaluation (`train.eval_at`) to the end of training."""
    name = metric.rsplit(".", 1)[-1]
    if not any(f"metrics.validation.{name}" in r for r in runs):
        name, higher, margin = "loss", False, measures.BY_NAME["loss"].margin
    pattern = re.compile(rf"metrics\.validation@(\d+(?:\.\d+)?)\.{re.escape(name)}")
    fractions = sorted({float(m.group(1)) for r in runs for k in r if (m := pattern.fullmatch(k))})
    if not fractions:
        return None
    since = fractions[-1]
    changes = [(r[f"metrics.validation.{name}"] - r[f"metrics.validation@{since:g}.{name}"]) * (1 if higher else -1)
               for r in runs if _numbers(r.get(f"metrics.validation.{name}"), r.get(f"metrics.validation@{since:g}.{name}"))]
    if not changes:
        return None
    return Improvement(f"validation {name}", since, sum(changes) / len(changes), len(changes), margin)


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _not_trained_reason(c: Configuration, tuning: dict[str, RateChoice], baseline: bool = False) -> str:
    """Why a comparison gets no verdict: its configuration (or the baseline) did not train, at which rates."""
    reasons = sorted(set(c.degenerate.values()))
    if blind(reasons):
        whose = f"every run of the baseline {c.label}" if baseline else "every run"
        return f"{whose} is degenerate on the benchmark ({reasons[0]})"
    who = f"the baseline {c.label} did not train" if baseline else "did not train"
    choice = tuning.get(c.label)
    if choice and len(choice.scores) > 1:
        return f"{who} at any {_tried(choice)}: widen the rate grid or train longer"
    return f"{who} (every run degenerate): try other learning rates or more steps"


def _tried(choice: RateChoice, more: str = "") -> str:
    """The points a configuration tried, as a reason names them: "rate tried (0.001, 0.01)", or with a grid
    "point tried (lr 0.001, model.dropout 0; ...)"; `more` is added inside the parentheses."""
    noun, sep = ("point", "; ") if choice.tune is not None and choice.tune.beyond_the_rate else ("rate", ", ")
    return f"{noun} tried ({sep.join(choice.describe(p) for p in choice.scores)}{more})"


def _not_run(label: str, how: str, choice: RateChoice, rows: list[dict[str, Any]], margin: float) -> NotRun:
    """A configuration that collapsed at every rate tried (`how`) and so got no seed runs."""
    reason = (f"did not train at any {_tried(choice, f'; every tuning run {how} on validation')}, so no seed runs: "
              "widen the rate grid or train longer")
    tuned = [r for r in rows if r["phase"] == "tune" and r["label"] == label]
    trainable, base = (next((r[k] for r in tuned if isinstance(r.get(k), (int, float))), None)
                       for k in ("cost.trainable_params", "cost.base_params"))
    return NotRun(label, not_trained(margin, reason), trainable, base)


def _design(spec: dict[str, Any], study_dir: Path) -> Design:
    """The planned looks of a study with seeds until resolved; a fixed design otherwise."""
    if not spec.get("until_resolved"):
        return FIXED
    from peftlab.config import validate
    from peftlab.specs import StudySpec

    return study_design(validate(StudySpec, spec, str(study_dir / "study.yaml")))


def _read_spec(study_dir: Path) -> dict[str, Any]:
    import yaml

    path = study_dir / "study.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def metric_name(metric: str) -> str:
    return metric.removeprefix("metrics.").replace(".", " ")


def recommend(analysis: Analysis) -> list[str]:
    """For each budget bracket, the best frontier configuration, and its verdict against the next cheaper
    one (paired test Holm-corrected over these steps, TOST for equivalence)."""
    front = [c for c in analysis.configurations if c.on_front and (c.trained or analysis.count_degenerate)]
    steps = [compare(c.quality, prev.quality, analysis.test) for prev, c in zip(front, front[1:])]
    verdicts = judge(steps, analysis.margin, analysis.higher_is_better, analysis.design)
    corrected = [v.p for v in verdicts]
    cost = COST_BY_NAME[analysis.cost]
    lines = []
    for i, c in enumerate(front):
        upper = f"below {cost.format(front[i + 1].costs[cost.name].mean)}" if i + 1 < len(front) else "and above"
        bracket = f"{cost.unit} {cost.format(c.costs[cost.name].mean)} {upper}"
        line = f"{bracket}: **{c.label}** ({metric_name(analysis.metric)} {c.summary.mean:.4f}"
        line += f", 95% CI {c.summary.low:.4f} to {c.summary.high:.4f})." if c.summary.n > 1 else ", one seed)."
        if i == 0:
            line += " The cheapest configuration on the frontier."
        else:
            step, p, v, cheaper = steps[i - 1], corrected[i - 1], verdicts[i - 1], front[i - 1].label
            test = f"difference {step.difference:+.4f}, {step.test}, n={step.n}, Holm p={format_p(p)}"
            if step.test == CONSTANT:
                line += (f" Differs from {cheaper} by exactly {step.difference:+.4f} on each of {step.n} "
                         "seeds: no test applies, and a fixed difference usually means a run predicting one class.")
            elif v.outcome == "better":
                line += f" Better than {cheaper} ({test})."
            elif v.outcome == "equivalent":
                line += (f" Equivalent to {cheaper} within ±{v.margin:g} ({test}; TOST): the cheaper configuration "
                         "is enough.")
            else:
                line += f" Not resolved against {cheaper} ({test}): {power_text(v)}."
        lines.append(line + degenerate_caution(c))
    return lines


def degenerate_caution(c: Configuration) -> str:
    """A warning for a line that names a configuration with degenerate runs."""
    if not c.degenerate:
        return ""
    total = c.seeds_run
    what = "answer the benchmark blindly" if blind(c.degenerate.values()) else "learned nothing"
    most = f"most of its runs {what}" if 2 * len(c.degenerate) > total else f"some of its runs {what}"
    return f" Caution: {len(c.degenerate)} of {total} runs of {c.label} are degenerate ({most})."


def power_text(v: Verdict) -> str:
    """What an unresolved comparison's seeds could detect, and how many would settle it."""
    if v.reason:
        return f"no test applies ({v.reason})"
    detect = (f"these seeds detect differences of {v.detectable:.4f} or more with 80% power (exact, two-sided "
              f"level {v.alpha:.3g} per look)")
    if v.seeds_needed is None:
        return f"{_futility(v)}{detect}; a difference of ±{v.margin:g} is out of reach of any practical number of seeds"
    return f"{_futility(v)}{detect}; {v.seeds_needed} seeds would detect ±{v.margin:g}{_beyond_maximum(v)}"


def _futility(v: Verdict) -> str:
    """Where seeds stopped for futility: at how many, and the chance of resolving it left."""
    if v.futility is None:
        return ""
    return (f"no more seeds after {v.stopped_at} (a {_chance(v.futility)} chance of resolving by {v.max_seeds}: "
            "futility); ")


def _chance(chance: float) -> str:
    """A predictive chance as the report writes it (a share of draws: none of them is not a chance of zero)."""
    return "<1%" if chance < 0.005 else f"{chance:.0%}"


def _beyond_maximum(v: Verdict) -> str:
    """Where the seeds needed lie beyond the design's maximum: what to change."""
    if v.seeds_needed is None or v.max_seeds is None or v.seeds_needed <= v.max_seeds:
        return ""
    change = f": raise seeds.max to {v.raise_max_to}" if v.raise_max_to else ""
    return f", more than this design's maximum of {v.max_seeds}{change}"


def verdict_text(v: Verdict) -> str:
    """The verdict cell of the report's table."""
    if v.outcome == "equivalent":
        return f"equivalent (±{v.margin:g})"
    if v.outcome == "not trained":
        return f"no verdict: {v.reason}"
    if v.outcome != "unresolved":
        return v.outcome
    if v.reason:
        return f"unresolved: {v.reason}"
    need = f"{v.seeds_needed} seeds for ±{v.margin:g}" if v.seeds_needed else f"±{v.margin:g} out of reach"
    stopped = (f"stopped at {v.stopped_at} seeds, {_chance(v.futility)} chance by {v.max_seeds}; "
               if v.futility is not None else "")
    return f"unresolved: {stopped}detects ≥{v.detectable:.4f}; {need}{_beyond_maximum(v)}"


def limits(analysis: Analysis, rows: list[dict[str, Any]]) -> list[str]:
    seeds = sorted({c.summary.n for c in analysis.configurations})
    models = sorted({c.config.get("model", {}).get("name", "?") for c in analysis.configurations})
    tasks = sorted({_task_name(c.config.get("task", {})) for c in analysis.configurations})
    out = [
        f"Seeds per configuration: {', '.join(map(str, seeds))}; with few seeds confidence intervals are wide "
        "and small differences cannot be told apart.",
        f"Model(s): {', '.join(models)}; task(s): {', '.join(tasks)}. Findings may not transfer to other models or tasks.",
        f"Quality is {metric_name(analysis.metric)} on the held-out test split; " + _tuning_limit(analysis),
    ]
    if analysis.interval == "bootstrap" and seeds[0] < BOOTSTRAP_MIN_SEEDS:
        out.append(f"Percentile-bootstrap intervals from {seeds[0]} seeds undercover (3 seeds: about 76% for a nominal "
                   f"95%); use t-intervals below {BOOTSTRAP_MIN_SEEDS} seeds.")
    constant = [c.label for c in analysis.configurations if c.comparison and c.comparison.test == CONSTANT]
    if constant:
        out.append(f"{', '.join(constant)}: the same difference from the baseline on every seed, so no test applies "
                   "(no p-value); this usually means runs that predict a single class.")
    out += _degenerate_limits(analysis)
    out += _convergence_limits(analysis)
    out += _batching_limits(analysis)
    out += _cache_limits(analysis)
    if analysis.failed:
        out.append(f"{analysis.failed} run(s) failed and are left out (see `peftlab study status`).")
    return out


def _tuning_limit(analysis: Analysis) -> str:
    if not analysis.tuning:
        return ("every configuration used its own fixed hyper-parameters (no per-configuration tuning unless the "
                "study varied them), so a comparison also compares how well that learning rate suits each.")
    edge = [c.label for c in analysis.tuning.values() if c.at_edge]
    metric = metric_name(next(iter(analysis.tuning.values())).metric)
    line = (f"each configuration's learning rate was chosen on the validation split ({metric}, with tuning seeds "
            "apart from the seeds compared; see the learning rates).")
    if edge:
        line += (f" The choice lies at the edge of the grid for {', '.join(edge)}: a better rate may lie beyond it; "
                 "widen the grid.")
    flat = [c.label for c in analysis.tuning.values() if c.undecided]
    if flat:
        line += (f" Every rate scored the same for {', '.join(flat)} (often: every one collapsed), so its rate is "
                 "the tie-break (the smallest), not a choice.")
    return line


def _degenerate_limits(analysis: Analysis) -> list[str]:
    flagged = [c for c in analysis.configurations if c.degenerate]
    unchecked = [c.label for c in analysis.configurations if not any(checkable(r) for r in c.runs)]
    skipped = ([f"No seed runs for {', '.join(n.label for n in analysis.not_run)}: each of its tuning runs collapsed on "
                "validation, at every rate tried (see the degenerate runs)."] if analysis.not_run else [])
    if unchecked and not flagged:
        return [f"Degenerate runs not checked for {', '.join(unchecked)}: their runs did not record predicted "
                "classes, the majority rate or the base model's loss (an older peftlab); run them again to check.",
                *skipped]
    if not flagged:
        return skipped or ["No degenerate runs: every classifier predicts more than one class and beats the majority "
                           "class beyond noise, and every causal LM ends below its base model's loss."]
    count = sum(len(c.degenerate) for c in flagged)
    how = ("left out of the statistics (--exclude-degenerate)" if analysis.exclude_degenerate
           else "included in the statistics; `--exclude-degenerate` leaves them out")
    names = ", ".join(f"{c.label} ({len(c.degenerate)})" for c in flagged)
    meaning = ("They answer the benchmark no better than always giving one answer would"
               if blind(r for c in flagged for r in c.degenerate.values())
               else "They measure a training failure (often the learning rate), not the configuration")
    return [f"{count} degenerate run(s), {how}: {names}. {meaning}; see the list of degenerate runs.", *skipped]


def _convergence_limits(analysis: Analysis) -> list[str]:
    """Configurations whose validation quality still rose by more than the margin at the end of training."""
    measured = [c for c in analysis.configurations if c.improvement]
    if not measured:
        return []
    rising = [c for c in measured if c.improvement.still_improving]
    first = measured[0].improvement
    stretch = f"the last {100 * (1 - first.since):.0f}% of the steps"
    if not rising:
        return [f"Convergence: every configuration's {first.metric} changed by less than the margin (±{first.margin:g}) "
                f"over {stretch} (mean over its runs)."]
    names = ", ".join(f"{c.label} ({c.improvement.change:+.4f}, {c.improvement.runs} runs)" for c in rising)
    return [f"Still improving at the end of training: {names}: the {first.metric} rose by more than the margin "
            f"(±{first.margin:g}) over {stretch}. Their verdicts are about this training budget; a longer run may "
            "change them."]


def _batching_limits(analysis: Analysis) -> list[str]:
    """Length-bucketed batches are a different training procedure from random ones, not only a faster one."""
    bucketed = [c.label for c in analysis.configurations
                if (c.config.get("train") or {}).get("batching", "bucketed") == "bucketed"]
    if not bucketed:
        return []
    which = "every configuration" if len(bucketed) == len(analysis.configurations) else ", ".join(bucketed)
    return [f"Batches were length-bucketed for {which} (`train.batching: bucketed`, the default): examples of "
            "similar length train together, unlike the random batches of most trainers. This changes what is "
            "learned, not only the speed: against PEFT + Trainer on MiniLM-L6 (benchmarks/reference.py, 6 seeds) "
            "random batches were equivalent within ±0.01 accuracy, bucketed ones scored 0.050 higher on average "
            "and avoided two majority-class collapses. Use `train.batching: random` for numbers to set beside "
            "another tool's."]


def _cache_limits(analysis: Analysis) -> list[str]:
    """Which configurations trained with the frozen-prefix cache (it never changes what is learned; its
    build time is reported apart from the training time)."""
    used = [c.label for c in analysis.configurations if any(r.get("speed.prefix_cache.used") for r in c.runs)]
    if not used:
        return []
    seconds = sum(r.get("speed.prefix_cache.build_seconds") or 0.0 for c in analysis.configurations for r in c.runs
                  if r.get("speed.prefix_cache.used"))
    return [f"Frozen-prefix cache used by {', '.join(used)} (no dropout below the adapted layers, so training is "
            f"unchanged); building and loading it took {seconds:.1f} s in all, not counted in training time."]


def _task_name(task: dict[str, Any]) -> str:
    name = task.get("name") or task.get("path") or task.get("dataset") or "?"
    limit = task.get("max_train_examples")
    return f"{name} ({limit} training examples)" if limit else str(name)


