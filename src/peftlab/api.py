"""peftlab from Python: plan, run, and studies end to end (run, load, analyse, draw, report).

```python
import peftlab.api as pl

directory = pl.run_study("placement", "studies/placement", jobs=2)
runs = pl.load_runs(directory)          # a DataFrame: one row per run
analysis = pl.analyse(directory, metric="accuracy", margin=0.02)
pl.verdicts(analysis)                   # a DataFrame: one row per configuration
pl.figure(analysis, "quality_vs_cost")  # a matplotlib Figure, inline in a notebook
pl.write_report(directory)              # report.html, report.md, tables.tex, ...
```

Every function here is what a CLI command does, with the same checks: bad input raises `PeftlabError` with the
same one line the command prints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import PeftlabError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from peftlab.analysis.analyze import Analysis
    from peftlab.plans.plan import Plan
    from peftlab.specs import PlanConfig, RunConfig, StudySpec
    from peftlab.studies.source import StudySource
    from peftlab.train.result import RunResult

__all__ = ["FIGURES", "PeftlabError", "analyse", "figure", "load_runs", "load_study", "make_plan", "run",
           "run_study", "verdicts", "write_report"]

FIGURES = ("quality_vs_cost", "differences", "training_curves", "rank_heatmaps")
"""The report's figures, by the name `figure` takes."""


def make_plan(config: PlanConfig) -> Plan:
    """Resolve the model's sites on the meta device and build the plan (no weights loaded); `peftlab plan`."""
    from peftlab.plans.plan import plan_on

    return plan_on(config.model, config.plan)


def run(config: RunConfig, output_dir: Path) -> RunResult:
    """Decide what `config` trains, then build, train, evaluate and measure it into `output_dir`; `peftlab run`."""
    from peftlab.resolve.run import resolve_run
    from peftlab.train.run import check_output_dir, execute_run

    check_output_dir(output_dir)  # before an importance probe or the data's tokenization spends time
    return execute_run(resolve_run(config), output_dir)


def load_study(source: StudySource, *, data: Path | str | None = None,
               settings: dict[str, Any] | list[str] | None = None) -> StudySpec:
    """A study's spec, validated: from a YAML file, a shipped study's name (`placement`, `allocation`, `methods`,
    ...), a study directory, or a mapping in the spec's own shape. `data`: train and test on this file instead;
    `settings`: values set in the study's base run config by dotted path (`{"task.max_train_examples": 2000}`),
    as `peftlab study run --set` does."""
    from peftlab.studies.source import study_spec

    return study_spec(source, None, _path(data), _settings(settings))[0]


def run_study(study: StudySource, directory: Path | str | None = None, *, jobs: int = 1, executor: str = "local",
              address: str | None = None, threads: int | None = None, gpus_per_run: float = 0.0,
              retry_failed: bool = False, rerun_changed: bool = False, data: Path | str | None = None,
              settings: dict[str, Any] | list[str] | None = None) -> Path:
    """Run a study, or resume one (finished runs are kept, runs new to an edited spec are added), and return its
    directory; `peftlab study run`. `study`: as `load_study` takes it. `directory`: default `studies/<name>`.
    Raises `PeftlabError` when runs failed, after every other run has finished (`load_runs` shows their errors)."""
    from peftlab.studies.runner import run_study as run_all
    from peftlab.studies.source import study_spec

    spec, study_dir = study_spec(study, _path(directory), _path(data), _settings(settings))
    store = run_all(spec, study_dir, jobs=jobs, executor=executor, address=address, retry_failed=retry_failed,
                    threads=threads, gpus=gpus_per_run, rerun_changed=rerun_changed)
    try:
        failed, total = store.counts().get("failed", 0), store.count()
    finally:
        store.close()
    if failed:
        raise PeftlabError(f"{failed} of {total} runs of {study_dir} failed; their errors are in load_runs(...)['error'], "
                           "and run_study(..., retry_failed=True) runs them again")
    return study_dir


def load_runs(directory: Path | str) -> pd.DataFrame:
    """Every run of a study, one row each (what `peftlab study export` writes): id, configuration label, seed,
    phase (tune | main), status, error, the configuration's axes (`axis.*`), metrics (`metrics.<split>.<name>`) and
    costs (`cost.*`)."""
    import pandas as pd

    from peftlab.records.results import run_rows
    from peftlab.records.store import open_existing

    store = open_existing(Path(directory))
    try:
        return pd.DataFrame(run_rows(store))
    finally:
        store.close()


def analyse(directory: Path | str, *, metric: str | None = None, margin: float | None = None,
            baseline: str | None = None, cost: str = "trainable", test: str = "t", interval: str = "t",
            exclude_degenerate: bool = False, count_degenerate: bool = False) -> Analysis:
    """A study's analysis, as `peftlab report` computes it: per configuration the quality (mean, confidence
    interval), its comparison with the baseline (paired by seed, Holm-corrected), its verdict (better, worse,
    equivalent within ±`margin`, unresolved, or none) and its costs; the Pareto frontier over `cost`;
    recommendations and the study's limits.

    `metric`: a test metric's name (`accuracy`, `mcc`, `loss`) or a dotted column (default: the study's, else the
    task's); `margin`: the equivalence margin in the metric's units (default: the study's, else the metric's own);
    `baseline`: a configuration's label (default: the all-placement uniform-rank LoRA); `test`: t | wilcoxon;
    `interval`: t | bootstrap; `exclude_degenerate`: leave runs that learned nothing out of the statistics;
    `count_degenerate`: give a verdict also to configurations whose runs all learned nothing."""
    from peftlab.analysis.analyze import analyze

    return analyze(Path(directory), metric=metric, cost=cost, baseline=baseline, test=test, interval=interval,
                   margin=margin, exclude_degenerate=exclude_degenerate, count_degenerate=count_degenerate)


def verdicts(analysis: Analysis) -> pd.DataFrame:
    """The report's main table as numbers, one row per configuration (cheapest first; configurations without seed
    runs last): `configuration`, `baseline` (bool), `n` (seeds), `mean`, `ci_low`, `ci_high`, `difference` (vs the
    baseline), `diff_low`, `diff_high`, `p_holm`, `outcome` (better | worse | equivalent | unresolved | not trained |
    not run | baseline), `verdict` (the report's text), `seeds_needed`, `margin`, `on_front`, `degenerate` (runs),
    `trainable`, `base` (parameters) and each tabled cost (`cost.<name>`)."""
    import pandas as pd

    from peftlab.analysis.analyze import verdict_text
    from peftlab.analysis.report import TABLED

    rows = []
    for c in analysis.configurations:
        cmp, v, base = c.comparison, c.verdict, c is analysis.baseline
        rows.append({
            "configuration": c.label, "baseline": base, "n": c.summary.n, "mean": c.summary.mean,
            "ci_low": c.summary.low, "ci_high": c.summary.high,
            "difference": cmp.difference if cmp else math.nan, "diff_low": cmp.low if cmp else math.nan,
            "diff_high": cmp.high if cmp else math.nan, "p_holm": math.nan if base else c.p_holm,
            "outcome": "baseline" if base else v.outcome, "verdict": "baseline" if base else verdict_text(v),
            "seeds_needed": None if base else v.seeds_needed, "margin": analysis.margin, "on_front": c.on_front,
            "degenerate": len(c.degenerate), "trainable": c.costs["trainable"].mean, "base": c.costs["base"].mean,
            **{f"cost.{cost.name}": c.costs[cost.name].mean for cost in TABLED},
        })
    for n in analysis.not_run:
        rows.append({"configuration": n.label, "baseline": False, "n": 0, "outcome": "not run",
                     "verdict": verdict_text(n.verdict), "margin": analysis.margin, "on_front": False,
                     "trainable": n.trainable, "base": n.base})
    return pd.DataFrame(rows).set_index("configuration")


def figure(analysis: Analysis, name: str) -> Figure:
    """One of the report's figures (`FIGURES`) as a matplotlib Figure: shown inline when a notebook cell returns
    it, saved with `.savefig(path)`."""
    from peftlab.analysis import figures

    if name not in figures.FIGURES:
        raise PeftlabError(f"figure {name!r}: valid figures are {', '.join(figures.FIGURES)}")
    return figures.FIGURES[name][1](analysis)


def write_report(directory: Path | str, **options: Any) -> dict[str, Path]:
    """Write report.html, report.md, tables.tex, summary.csv and figures/ into the study's directory, with
    `analyse`'s options; `peftlab report`. Returns format -> file."""
    from peftlab.analysis.report import write_report as write

    return write(Path(directory), **options)[1]


def _path(value: Path | str | None) -> Path | None:
    return None if value is None else Path(value)


def _settings(settings: dict[str, Any] | list[str] | None) -> list[str]:
    """KEY=VALUE strings (as `--set` takes them) from a mapping of dotted paths to values."""
    import yaml

    if settings is None or isinstance(settings, list):
        return settings or []
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in settings.items()]
