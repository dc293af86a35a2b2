"""One resolved run end to end: its phases in order, and its result.

What to train (plan, budget match, importance scores, data) is decided before, in `peftlab.resolve`; the phases
(build, prepare, train, evaluate, generate, time, save) are in `train.context` and `train.phases`. The run
directory is written as `<dir>.partial` and renamed when the run ends, so a crash never leaves a directory
that looks like a result. A NaN/inf loss ends the run with status `failed`; a run stopped at `train.stop_at`
ends with status `stopped` and keeps its `.partial` directory to resume from.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import PeftlabError, warn
from peftlab.files import check_output, write_atomic
from peftlab.train import distributed, phases
from peftlab.train.checkpoint import DamagedCheckpoint, history_rows, same_training
from peftlab.train.context import RunContext, build, checkpoints_for
from peftlab.train.result import Costs, RunResult
from peftlab.train.tracking import finish_trackers, flat, log_result, log_row, tracker_run_ids, trackers

if TYPE_CHECKING:
    from peftlab.resolve.resolved import ResolvedRun


def check_output_dir(output_dir: Path) -> None:
    """A run writes only into a new or empty directory (and its `.partial` sibling while it runs)."""
    check_output(output_dir, "--output", directory=True)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise PeftlabError(f"{output_dir}: already exists and is not empty; choose another --output")


def execute_run(run: ResolvedRun, output_dir: Path) -> RunResult:
    """Build, train, evaluate and measure `run`; write its outputs to `output_dir` (nothing there if it
    raises) and return its result. A run stopped at `train.stop_at` writes no `output_dir`: its `.partial`
    directory holds the state the same config resumes from."""
    check_output_dir(output_dir)  # in every process: they all stop, or none
    if not distributed.is_main():  # it trains and evaluates beside the main process, which writes the outputs
        with tempfile.TemporaryDirectory(prefix="peftlab-process-") as scratch:
            return _execute(run, Path(scratch) / "run.partial")
    partial_dir = output_dir.with_name(output_dir.name + ".partial")
    if not _resumable(run, partial_dir):
        shutil.rmtree(partial_dir, ignore_errors=True)
    try:
        result = _execute(run, partial_dir)
    except KeyboardInterrupt:
        checkpoints = checkpoints_for(run, partial_dir)
        if not checkpoints.latest_step():
            shutil.rmtree(partial_dir, ignore_errors=True)
        raise  # with a checkpoint, the same command resumes from it
    except BaseException:
        shutil.rmtree(partial_dir, ignore_errors=True)
        raise
    if result.status == "stopped":
        return result
    if output_dir.exists():
        output_dir.rmdir()  # empty, checked above
    partial_dir.rename(output_dir)
    return result


def _resumable(run: ResolvedRun, partial_dir: Path) -> bool:
    """A `.partial` directory left by a killed run of the same config (or one stopped at a rung: its
    `train.stop_at` aside), with a checkpoint to resume from. A damaged checkpoint (or history) is named in
    one warning, and the run starts over."""
    checkpoints = checkpoints_for(run, partial_dir)
    config = partial_dir / "config.yaml"
    if not config.is_file() or not same_training(config.read_text(), run.config.to_yaml()):
        return False
    try:
        step = checkpoints.verify(run.total_steps)
        if step:
            history_rows(partial_dir / "metrics.jsonl", step)
    except DamagedCheckpoint as damaged:
        warn(f"{damaged}: the checkpoint cannot be resumed from, so the run starts over")
        return False
    return step > 0


def _execute(run: ResolvedRun, partial_dir: Path) -> RunResult:
    ctx = build(run, partial_dir)
    partial_dir.mkdir(parents=True, exist_ok=True)  # still there only where `execute_run` found it resumable
    (partial_dir / "config.yaml").write_text(run.config.to_yaml())
    tracking, accelerator = run.config.tracking, ctx.accelerator
    if tracking is not None and distributed.is_main():
        started = partial_dir / "trackers.json"  # a run resumed from a checkpoint continues its tracker runs
        resumed = json.loads(started.read_text()) if started.is_file() else None
        accelerator.log_with = trackers(tracking, partial_dir, partial_dir.name.removesuffix(".partial"), resumed)
        accelerator.init_trackers(tracking.project, config=flat(run.config.model_dump(mode="json", by_alias=True)))
        write_atomic(started, json.dumps(tracker_run_ids(accelerator.trackers)))
    try:
        return _run_phases(ctx)
    finally:
        finish_trackers(accelerator)  # their runs and files closed before the directory is renamed


def _run_phases(ctx: RunContext) -> RunResult:
    run, partial_dir = ctx.run, ctx.partial_dir
    (partial_dir / "plan.json").write_text(run.plan.to_json() + "\n")
    if run.scores:  # the importance scores the ranks came from
        shutil.copyfile(run.scores, partial_dir / "importance.json")
    step = ctx.checkpoints().latest_step()
    if step:  # a resumed run: the rows up to its checkpoint (verified by `_resumable`)
        rows = history_rows(partial_dir / "metrics.jsonl", step)
        (partial_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    with (partial_dir / "metrics.jsonl").open("a") as history:
        def record(row: dict[str, Any]) -> None:
            history.write(json.dumps(row) + "\n")
            history.flush()
            log_row(ctx.accelerator, row)

        ctx.record = record
        held_out = phases.held_out(ctx)
        references = phases.prepare(ctx, held_out)
        trained = phases.train(ctx, held_out)
        with ctx.forward_only():
            metrics, measured = _after_training(ctx, held_out, references, trained)
    failure = trained.loop.failure or non_finite(metrics)
    result = RunResult(
        status="failed" if failure else "stopped" if trained.loop.stopped else "done",
        error=failure,
        metrics=metrics,
        cost=_cost(ctx, trained, measured, phases.mean_length(held_out.timed)),
        final_train_loss=trained.loop.final_loss,
        method=ctx.method.report(ctx.model),
        budget=run.budget.to_dict() if run.budget else None,
        speed=trained.speed,
        data={"train": len(run.data.train), "validation": len(run.data.validation), "test": len(run.data.test),
              "dropped": run.data.dropped, "truncated": run.data.truncated, "labels": run.data.labels,
              "kind": run.data.kind, **_benchmark_versions(measured)},
        environment=ctx.environment(),
        inputs=run.inputs,
        config=run.config.model_dump(mode="json", by_alias=True),
    )
    if result.status == "stopped":
        return result  # its validation scores go to the caller; the directory is a checkpoint
    (partial_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    log_result(ctx.accelerator, result.to_dict(), trained.loop.steps)
    return result


def _after_training(ctx: RunContext, held_out: phases.HeldOut, references: phases.References,
                    trained: phases.Trained) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(metrics, the costs measured after training): evaluation in every process; generation, latency and the
    adapter in the main one (sharded layers gathered on every process meanwhile). Nothing after a failed loop;
    the validation split alone after a stopped one."""
    measured: dict[str, Any] = {"latency_ms_per_batch": {}, "adapter_bytes": None}
    if trained.loop.failure:
        return {}, measured
    if trained.loop.stopped:
        return {"validation": ctx.evaluate(held_out.validation)} if held_out.validation else {}, measured
    metrics = phases.evaluate(ctx, held_out, references, trained.loop.steps)
    state = ctx.state_to_save()  # with sharded layers: gathered by every process
    with ctx.gathered():
        if not distributed.is_main():
            return metrics, measured
        for feature in trained.features:
            feature.remove()  # generation and latency: the model's own forward, as it would be served
        if ctx.run.prompts:
            measured["generation"] = phases.generate_completions(ctx, references)
            metrics.setdefault("test", {}).update(measured["generation"].pop("scores"))
        if phases.benchmarks_apply(ctx):
            measured["benchmarks"] = phases.score_benchmarks_after(ctx, references)
            metrics["benchmarks"] = measured["benchmarks"].pop("scores")
        measured["latency_ms_per_batch"] = phases.time_inference(ctx, held_out.timed)
        measured["adapter_bytes"] = phases.save(ctx, state)
    return metrics, measured


def _benchmark_versions(measured: dict[str, Any]) -> dict[str, Any]:
    """The lm-eval version of each benchmark task a run scored (scores of different versions do not compare)."""
    return {"benchmark_versions": measured["benchmarks"]["versions"]} if "benchmarks" in measured else {}


def _cost(ctx: RunContext, trained: phases.Trained, measured: dict[str, Any], padded_length: float | None) -> Costs:
    """result.json's `cost`: parameters, time, tokens, memory, sizes, latency (`peftlab.measures.COSTS` names
    those a study can be judged by)."""
    run, method, counts, loop, memory = ctx.run, ctx.method, ctx.counts, trained.loop, trained.memory
    trainable = counts["adapter"] + counts["head"]
    extra = run.plan.extra_params  # the plan's biases and norms: trained, but parameters of the base
    total = ctx.base_params + (counts["adapter"] - extra if method.adds_parameters else 0)
    return Costs(
        trainable_params=trainable,
        adapter_params=counts["adapter"],
        head_params=counts["head"],
        plan_params=sum(method.site_params(p.site, p.rank) for p in run.plan.sites) + extra if method.counted_per_site else None,
        base_params=ctx.base_params,
        total_params=total,
        trainable_share=trainable / total,
        steps=loop.steps,
        planned_steps=run.total_steps,
        # optimizer steps only: the same work for every seed of a configuration, whichever built a cache
        train_seconds=loop.train_seconds,
        # the probe an importance allocation came from (run once per study, then read from the cache)
        importance_probe_seconds=json.loads(run.scores.read_text())["seconds"] if run.scores else None,
        train_tokens=loop.train_tokens,
        tokens_per_second=loop.train_tokens / loop.train_seconds if loop.train_seconds else 0.0,
        padding_fraction=1 - loop.train_tokens / loop.train_positions if loop.train_positions else 0.0,
        peak_memory_bytes=memory.training,
        peak_memory_kind=memory.kind,
        peak_memory_process_bytes=memory.process,
        adapter_bytes=measured["adapter_bytes"],
        frozen_weight_bytes=ctx.frozen["quantized"] + ctx.frozen["other"],
        quantized_weight_bytes=ctx.frozen["quantized"],
        quantized_params=ctx.frozen["quantized_params"],
        latency_ms_per_batch=measured["latency_ms_per_batch"],
        latency_padded_length=padded_length,  # positions per timed example
        **measured.get("generation", {}),
        benchmark_seconds=measured.get("benchmarks", {}).get("benchmark_seconds"),
    )


def non_finite(metrics: dict[str, dict[str, Any]]) -> str | None:
    """Why a run whose training finished is still a failure: a NaN or infinite metric (a diverged evaluation
    would otherwise flow into a study's statistics as a number)."""
    for split, values in metrics.items():
        for name, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                return f"non-finite {split} {name} ({value}) after training"
    return None
