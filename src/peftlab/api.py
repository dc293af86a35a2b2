"""The library entry points, one function per CLI command."""

from __future__ import annotations

from pathlib import Path

from peftlab.plans.plan import Plan, plan_on
from peftlab.resolve.run import resolve_run
from peftlab.specs import PlanConfig, RunConfig
from peftlab.train.result import RunResult
from peftlab.train.run import check_output_dir, execute_run


def make_plan(config: PlanConfig) -> Plan:
    """Resolve the model's sites on the meta device and build the plan (no weights loaded)."""
    return plan_on(config.model, config.plan)


def run(config: RunConfig, output_dir: Path) -> RunResult:
    """Decide what `config` trains, then build, train, evaluate and measure it into `output_dir`."""
    check_output_dir(output_dir)  # before an importance probe or the data's tokenization spends time
    return execute_run(resolve_run(config), output_dir)
