"""One resolved run end to end: model, method, loop with its speed features, evaluation, costs, outputs.

What to train (plan, budget match, importance scores, data) is decided before, in `peftlab.resolve`. The run
directory is written as `<dir>.partial` and renamed when the run ends, so a crash never leaves a directory
that looks like a result. A NaN/inf loss ends the run with status `failed`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import tempfile
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from peftlab.errors import PeftlabError, warn
from peftlab.files import check_output, write_atomic
from peftlab.methods.base import Method, trainable_counts
from peftlab.methods.registry import make_method
from peftlab.models.load import cache_dir, count_params, head_modules, load_model, seeded_weights, unwrap
from peftlab.models.quantize import DTYPES, weight_bytes
from peftlab.plans.plan import Plan
from peftlab.specs import ModelSpec, RunConfig
from peftlab.tasks.kinds import task_kind
from peftlab.tasks.prepare import TaskData, collate, collate_indexed
from peftlab.train import distributed
from peftlab.train.batching import Batches
from peftlab.train.checkpoint import Checkpoints, DamagedCheckpoint, history_rows
from peftlab.train.device import (
    Backends,
    PeakMemory,
    choose_device,
    cpu_has_bf16,
    memory_in_use,
    mixed_precision,
    peak_memory,
    reset_peak_memory,
)
from peftlab.train.evaluate import evaluate
from peftlab.train.generation import (
    SAMPLES_FILE,
    Completions,
    Prompts,
    base_cache_key,
    generate,
    read_cached,
    score,
    write_cached,
    write_samples,
)
from peftlab.train.loop import LoopResult, train_loop
from peftlab.train.loss import batch_nll
from peftlab.train.measure import directory_bytes, latency_ms
from peftlab.train.result import RunResult
from peftlab.train.speed import switched_on
from peftlab.train.speed.base import RunSetting, installed
from peftlab.train.tracking import finish_trackers, flat, log_result, log_row, tracker_run_ids, trackers

if TYPE_CHECKING:
    from peftlab.methods.specs import MethodSpec
    from peftlab.resolve.budget import BudgetMatch


def _precision(requested: str, device: str) -> str:
    """accelerate's mixed precision for `train.precision` on `device` (see `device.mixed_precision`); a warning
    where bf16 autocast is asked for on a CPU without bf16 instructions."""
    cpu_bf16 = cpu_has_bf16()
    if device == "cpu" and requested == "bf16" and not cpu_bf16:
        warnings.warn("train.precision: bf16 on a CPU where peftlab finds no bf16 instructions (AVX512-BF16 or "
                      "AMX); it may be slower than fp32", stacklevel=2)
    return mixed_precision(requested, device, Backends.present(), cpu_bf16)


@dataclass(frozen=True)
class ResolvedRun:
    """Everything a run decided before it trains (see `peftlab.resolve`)."""

    config: RunConfig  # as given: saved with the run
    model: ModelSpec  # with the task's head
    method: MethodSpec  # with its size chosen where a budget is matched
    plan: Plan
    data: TaskData  # tokenized
    pad_id: int
    total_steps: int
    budget: BudgetMatch | None = None
    scores: Path | None = None  # the importance scores the ranks came from
    tokenizer: Any = None  # decodes generated completions
    prompts: Prompts | None = None  # test prompts to complete (eval.generate)
    forgetting: list[dict[str, Any]] | None = None  # a general text's chunks (eval.forgetting)
    inputs: dict[str, str] = field(default_factory=dict)  # identity of every input, taken before any was read


def check_output_dir(output_dir: Path) -> None:
    """A run writes only into a new or empty directory (and its `.partial` sibling while it runs)."""
    check_output(output_dir, "--output", directory=True)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise PeftlabError(f"{output_dir}: already exists and is not empty; choose another --output")


def execute_run(run: ResolvedRun, output_dir: Path) -> RunResult:
    """Build, train, evaluate and measure `run`; write its outputs to `output_dir` (nothing there if it
    raises) and return its result."""
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
        checkpoints = _checkpoints(run, partial_dir)
        if checkpoints is None or not checkpoints.latest_step():
            shutil.rmtree(partial_dir, ignore_errors=True)
        raise  # with a checkpoint, the same command resumes from it
    except BaseException:
        shutil.rmtree(partial_dir, ignore_errors=True)
        raise
    if output_dir.exists():
        output_dir.rmdir()  # empty, checked above
    partial_dir.rename(output_dir)
    return result


def _checkpoints(run: ResolvedRun, partial_dir: Path) -> Checkpoints | None:
    every = run.config.train.checkpoint_every
    return Checkpoints(partial_dir / "checkpoint", every) if every else None


def _resumable(run: ResolvedRun, partial_dir: Path) -> bool:
    """A `.partial` directory left by a killed run of the same config, with a checkpoint to resume from. A
    damaged checkpoint (or history) is named in one warning, and the run starts over."""
    checkpoints = _checkpoints(run, partial_dir)
    config = partial_dir / "config.yaml"
    if checkpoints is None or not config.is_file() or config.read_text() != run.config.to_yaml():
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
    spec = run.config.train
    set_seed(spec.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # accelerate keeps one precision per process; a run sets its own (runs of one process may differ).
    # The process-wide distributed state (PartialState) is kept.
    AcceleratorState._reset_state()
    device = choose_device(spec.device)  # the method's support for it was checked by `resolve_run`
    # split_batches: train.batch_size is the global batch, shared out over the processes (train.distributed), so
    # the prepared scheduler steps once per optimizer step, not once per process
    accelerator = Accelerator(mixed_precision=_precision(spec.precision, device), cpu=device == "cpu",
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    before_model = memory_in_use(device)  # imports and data: not what training costs
    model = load_model(run.model, seed=spec.seed, dtype=DTYPES[run.model.dtype])
    base_params = count_params(model)
    head = head_modules(model)
    method = make_method(run.method, run.total_steps)
    model = method.apply(model, run.plan, head).to(accelerator.device)
    counts = trainable_counts(model, head)
    frozen = weight_bytes(model)

    partial_dir.mkdir(parents=True, exist_ok=True)  # still there only where `execute_run` found it resumable
    (partial_dir / "config.yaml").write_text(run.config.to_yaml())
    tracking = run.config.tracking
    if tracking is not None and distributed.is_main():
        started = partial_dir / "trackers.json"  # a run resumed from a checkpoint continues its tracker runs
        resumed = json.loads(started.read_text()) if started.is_file() else None
        accelerator.log_with = trackers(tracking, partial_dir, partial_dir.name.removesuffix(".partial"), resumed)
        accelerator.init_trackers(tracking.project, config=flat(run.config.model_dump(mode="json", by_alias=True)))
        write_atomic(started, json.dumps(tracker_run_ids(accelerator.trackers)))
    try:
        return _train_and_record(run, model, method, accelerator, before_model, partial_dir, base_params, head,
                                 counts, frozen)
    finally:
        finish_trackers(accelerator)  # their runs and files closed before the directory is renamed


def _train_and_record(run: ResolvedRun, model, method: Method, accelerator: Accelerator, before_model: int,
                      partial_dir: Path, base_params: int, head: list[str], counts: dict[str, int],
                      frozen: dict[str, int]) -> RunResult:
    data = run.data
    (partial_dir / "plan.json").write_text(run.plan.to_json() + "\n")
    if run.scores:  # the importance scores the ranks came from
        shutil.copyfile(run.scores, partial_dir / "importance.json")
    checkpoints = _checkpoints(run, partial_dir)
    step = checkpoints.latest_step() if checkpoints is not None else 0
    if step:  # a resumed run: the rows up to its checkpoint (verified by `_resumable`)
        rows = history_rows(partial_dir / "metrics.jsonl", step)
        (partial_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    with (partial_dir / "metrics.jsonl").open("a") as history:
        def record(row: dict[str, Any]) -> None:
            history.write(json.dumps(row) + "\n")
            history.flush()
            log_row(accelerator, row)

        outcome = _train_and_measure(run, model, method, accelerator, before_model, record, partial_dir)
    trainable = counts["adapter"] + counts["head"]
    total = base_params + (counts["adapter"] if method.adds_parameters else 0)
    loop = outcome.loop
    failure = loop.failure or non_finite(outcome.metrics)
    result = RunResult(
        status="failed" if failure else "done",
        error=failure,
        metrics=outcome.metrics,
        cost={
            "trainable_params": trainable,
            "adapter_params": counts["adapter"],
            "head_params": counts["head"],
            "plan_params": (sum(method.site_params(p.site, p.rank) for p in run.plan.sites)
                            if method.counted_per_site else None),
            "base_params": base_params,
            "total_params": total,
            "trainable_share": trainable / total,
            "steps": loop.steps,
            # optimizer steps only: the same work for every seed of a configuration, whichever built a cache
            "train_seconds": loop.train_seconds,
            # the probe an importance allocation came from (run once per study, then read from the cache)
            "importance_probe_seconds": json.loads(run.scores.read_text())["seconds"] if run.scores else None,
            "train_tokens": loop.train_tokens,
            "tokens_per_second": loop.train_tokens / loop.train_seconds if loop.train_seconds else 0.0,
            "padding_fraction": 1 - loop.train_tokens / loop.train_positions if loop.train_positions else 0.0,
            "peak_memory_bytes": outcome.memory.training,
            "peak_memory_kind": outcome.memory.kind,
            "peak_memory_process_bytes": outcome.memory.process,
            "adapter_bytes": outcome.adapter_bytes,
            "frozen_weight_bytes": frozen["quantized"] + frozen["other"],
            "quantized_weight_bytes": frozen["quantized"],
            "quantized_params": frozen["quantized_params"],
            "latency_ms_per_batch": outcome.latency,
            "latency_padded_length": outcome.latency_length,  # positions per timed example
            **(outcome.generation or {}),
        },
        final_train_loss=loop.final_loss,
        method=method.report(model),
        budget=run.budget.to_dict() if run.budget else None,
        speed=outcome.speed,
        data={"train": len(data.train), "validation": len(data.validation), "test": len(data.test),
              "dropped": data.dropped, "truncated": data.truncated, "labels": data.labels, "kind": data.kind},
        environment=_environment(accelerator, model),
        inputs=run.inputs,
        config=run.config.model_dump(mode="json", by_alias=True),
    )
    (partial_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    log_result(accelerator, result.to_dict(), loop.steps)
    return result


def validation_curve(history: Path, fractions: list[float] | None, total_steps: int) -> dict[str, dict[str, Any]]:
    """`validation@F` -> the validation metrics at fraction F of the steps, read from the run's metrics.jsonl
    (so that a run resumed from a checkpoint keeps the evaluations before it)."""
    wanted = {max(1, round(f * total_steps)): f for f in fractions or () if round(f * total_steps) < total_steps}
    curve = {}
    for line in history.read_text().splitlines() if wanted and history.is_file() else []:
        row = json.loads(line)
        if row.get("split") == "validation" and row["step"] in wanted:
            curve[f"validation@{wanted[row['step']]:g}"] = {k: v for k, v in row.items() if k not in ("step", "split")}
    return curve


def non_finite(metrics: dict[str, dict[str, Any]]) -> str | None:
    """Why a run whose training finished is still a failure: a NaN or infinite metric (a diverged evaluation
    would otherwise flow into a study's statistics as a number)."""
    for split, values in metrics.items():
        for name, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                return f"non-finite {split} {name} ({value}) after training"
    return None


@dataclass
class _Outcome:
    loop: LoopResult
    memory: PeakMemory
    metrics: dict[str, dict[str, Any]]
    speed: dict[str, dict[str, Any] | None]
    latency: dict[str, float]
    latency_length: float | None
    adapter_bytes: int | None
    generation: dict[str, Any] | None = None  # completions' count, tokens and timing


def _train_and_measure(run: ResolvedRun, model, method: Method, accelerator: Accelerator, before_model: int,
                       record: Callable[[dict[str, Any]], None], partial_dir: Path) -> _Outcome:
    """Train with the speed features installed, then evaluate, time inference and save the adapter."""
    spec, data, pad_id = run.config.train, run.data, run.pad_id
    lengths = [len(e["input_ids"]) for e in data.train]
    sampler = Batches(lengths, spec.batch_size, spec.seed, bucketed=spec.batching == "bucketed")
    train_loader = DataLoader(range(len(data.train)), batch_sampler=sampler,
                              collate_fn=partial(collate_indexed, examples=data.train, pad_id=pad_id))
    eval_batches = {"validation": _eval_batches(data.validation, spec.eval_batch_size, pad_id),
                    "test": _eval_batches(data.test, spec.eval_batch_size, pad_id) if spec.evaluate_test else []}
    timed = latency_sample(data.test or data.validation, spec.latency_batches, spec.eval_batch_size, pad_id)
    evaluate_split = partial(evaluate, kind=data.kind, n_labels=len(data.labels), device=accelerator.device,
                             autocast=accelerator.autocast, hidden_states=method.hidden_states)
    # methods that start from the data (EVA) see the first training examples, before any speed feature changes
    # the forward
    def on_device(split: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(accelerator.device) for k, v in b.items()} for b in initial_batches(split, spec.batch_size, pad_id)]

    method.initialize(model, on_device(data.train), held_out=on_device(data.validation))

    # a causal LM that learned nothing keeps its starting loss: the reference its result is judged against
    base_loss = _base_loss(model, method, eval_batches["test"], evaluate_split) if task_kind(data.kind).generates else None
    forgetting_batches = _eval_batches(run.forgetting, spec.eval_batch_size, pad_id) if run.forgetting else []
    forgetting_base = _base_loss(model, method, forgetting_batches, evaluate_split)
    base_completions = _base_completions(run, model, method, accelerator) if run.prompts and distributed.is_main() else None

    def on_eval(step: int) -> None:
        record({"step": step, "split": "validation", **evaluate_split(model, eval_batches["validation"])})

    reset_peak_memory(accelerator.device.type)
    setting = RunSetting(data.kind, data.train, data.cache_file.stem, pad_id, spec.eval_batch_size, accelerator.device,
                         accelerator.autocast, accelerator.mixed_precision)
    features, speed = installed(switched_on(spec), model, method, setting)
    checkpoints = _checkpoints(run, partial_dir)
    loop = train_loop(model, method, train_loader, data.kind, run.total_steps, spec, accelerator, record, on_eval,
                      features, checkpoints)
    if checkpoints is not None:
        speed["checkpoint"] = {"every": checkpoints.every, "resumed_from_step": loop.resumed_from}
        if not loop.failure:
            checkpoints.remove()  # the adapter is saved with the result; optimizer state is not kept
    memory = peak_memory(before_model, accelerator.device.type)  # the training peak, before evaluation adds its own
    outcome = _Outcome(loop, memory, {}, speed, {}, _mean_length(timed) if timed else None, None)
    if loop.failure:
        return outcome
    for split_name, split_batches in eval_batches.items():
        if split_batches:
            outcome.metrics[split_name] = evaluate_split(model, split_batches)
            record({"step": loop.steps, "split": split_name, **outcome.metrics[split_name]})
    outcome.metrics.update(validation_curve(partial_dir / "metrics.jsonl", spec.eval_at, run.total_steps))
    if base_loss is not None and "test" in outcome.metrics:
        outcome.metrics["test"]["base_loss"] = base_loss
    if forgetting_batches:
        loss = evaluate_split(model, forgetting_batches)
        outcome.metrics["forgetting"] = {"base_loss": forgetting_base, "loss": loss["loss"],
                                         "increase": loss["loss"] - forgetting_base, "count": loss["count"]}
    if not distributed.is_main():  # generation, latency and the adapter come from the main process
        return outcome
    for feature in features:
        feature.remove()  # generation and latency: the model's own forward, as it would be served
    if run.prompts:
        outcome.generation = _generation(run, model, method, accelerator, base_completions, partial_dir)
        outcome.metrics.setdefault("test", {}).update(outcome.generation.pop("scores"))
    with accelerator.autocast():  # inference at the training's precision
        outcome.latency = _latencies(model, method, timed, data.kind, accelerator.device)
    method.save(model, partial_dir / "adapter")
    outcome.adapter_bytes = directory_bytes(partial_dir / "adapter")
    return outcome


def initial_batches(train: list[dict[str, Any]], size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The batches `Method.initialize` reads: the first `INIT_BATCHES` batches' worth of a split's examples (the
    training split's, and the validation split's for its held-out checks), sorted by length."""
    return _eval_batches(train[: INIT_BATCHES * size], size, pad_id)


def _eval_batches(split: list[dict[str, Any]], size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Batches sorted by length (little padding): evaluation metrics do not depend on the order."""
    ordered = sorted(split, key=lambda e: len(e["input_ids"]))
    return [collate(ordered[i : i + size], pad_id) for i in range(0, len(ordered), size)]


def _base_loss(model, method, batches: list[dict[str, torch.Tensor]], evaluate_split) -> float | None:
    """Test loss before training: the base model's (adapters whose initialization changes the output, such
    as prefixes, are bypassed; a zero-initialized LoRA already computes the base)."""
    if not batches:
        return None
    bypass = method.bypassed(model)
    with bypass if bypass is not None else nullcontext():
        return evaluate_split(model, batches)["loss"]


def _base_completions(run: ResolvedRun, model, method: Method, accelerator: Accelerator) -> Completions | None:
    """The base model's completions of the test prompts, before training (adapters that change the output
    at initialization are bypassed). Cached: every run of a study on the same base computes the same ones;
    the key holds everything that sets the base's weights (the files', and the seed of a model built from a
    config)."""
    spec = run.config.eval.generate
    if not spec.base:
        return None
    identity = {"model": run.model.model_dump(mode="json"), "weights": run.inputs.get("model"),
                "weights_seed": run.config.train.seed if seeded_weights(run.model) else None,
                "method": run.method.name, "quantization": method.base_identity(),
                "precision": accelerator.mixed_precision, "device": accelerator.device.type}
    file = cache_dir() / "generations" / f"{base_cache_key(identity, run.prompts, spec)}.json"
    if (cached := read_cached(file)) is not None:
        return cached
    bypass = method.bypassed(model)
    with bypass if bypass is not None else nullcontext():
        completions = generate(model, run.prompts, spec, run.tokenizer, accelerator.device, accelerator.autocast,
                               method.complete)
    write_cached(file, completions)
    return completions


def _generation(run: ResolvedRun, model, method: Method, accelerator: Accelerator, base: Completions | None,
                partial_dir: Path) -> dict[str, Any]:
    """Complete the test prompts with the adapted model (merged where the method merges), score the
    completions (and the base model's), write the samples file; the mean scores under `scores`, the rest for
    the run's costs."""
    prompts, spec = run.prompts, run.config.eval.generate
    with method.merged(model) if method.mergeable else nullcontext(model) as serving:  # as it would be served
        adapted = generate(serving, prompts, spec, run.tokenizer, accelerator.device, accelerator.autocast,
                           method.complete)
    adapted_scores = score(adapted.texts, prompts.references)
    base_scores = score(base.texts, prompts.references) if base is not None else None
    write_samples(partial_dir / SAMPLES_FILE, prompts, adapted, adapted_scores, base, base_scores)
    scores = {**adapted_scores.means(), "generated": len(adapted.texts),
              "mean_new_tokens": sum(adapted.new_tokens) / max(len(adapted.new_tokens), 1)}
    if base_scores is not None:
        scores.update(base_scores.means("base_"))
    return {"scores": scores, "generation_seconds": adapted.seconds, "generated_tokens": sum(adapted.new_tokens),
            "generation_tokens_per_second": adapted.tokens_per_second}


INIT_BATCHES = 16  # training batches a data-driven init reads
LATENCY_SEED = 0  # not the training seed: every configuration and seed of a study times the same batches


def latency_sample(split: list[dict[str, Any]], batches: int, size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """`batches` batches of `size` examples drawn at random (a fixed draw) from `split`: requests as a server
    meets them, of representative length, unlike the sorted evaluation batches whose first are the shortest."""
    count = min(len(split), batches * size)
    chosen = random.Random(LATENCY_SEED).sample(range(len(split)), count)
    return [collate([split[i] for i in chosen[j : j + size]], pad_id) for j in range(0, count, size)]


def _mean_length(batches: list[dict[str, torch.Tensor]]) -> float:
    """Padded positions per example over the timed batches."""
    return sum(b["input_ids"].shape[1] for b in batches) / len(batches)


def _latencies(model, method, batches: list[dict], kind: str, device) -> dict[str, float]:
    if not batches:
        return {}
    on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]
    forward = partial(batch_nll, model, kind=kind, hidden_states=method.hidden_states)
    was_training = model.training
    model.eval()
    timings = {"unmerged": latency_ms(forward, on_device, device)}
    bypass = method.bypassed(model)  # unmergeable adapters: their overhead against the bare base
    if bypass is not None:
        with bypass:
            timings["base"] = latency_ms(forward, on_device, device)
    if method.mergeable:
        with method.merged(model) as merged:
            timings["merged"] = latency_ms(partial(batch_nll, merged, kind=kind, hidden_states=method.hidden_states),
                                           on_device, device)
    model.train(was_training)
    return timings


def _environment(accelerator: Accelerator, model) -> dict[str, Any]:
    """The machine and versions a run used (recorded, not part of what decides reuse)."""
    from peftlab.provenance import device_identity, versions

    found = versions()
    return {
        "device": str(accelerator.device),
        **device_identity(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **{name: found[name] for name in ("torch", "transformers", "peft")},
        "versions": found,
        "model_commit": getattr(getattr(unwrap(model), "config", None), "_commit_hash", None),  # a Hub model's
        "mixed_precision": accelerator.mixed_precision,
        "processes": accelerator.num_processes,  # data parallel: train.batch_size is the global batch
    }
