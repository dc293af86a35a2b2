"""A run's phases after its build (`train.context.build`), in the order `train.run` calls them, each over the run's
context and returning its part of the result:

- `held_out`: the evaluation, forgetting and latency batches;
- `prepare`: the method's data-driven start (`Method.initialize`) and the base model's references (its loss and
  completions), before any step changes the weights;
- `train`: the loop with the speed features installed;
- `evaluate`: every held-out split, the validation curve, the forgetting probe;
- `generate`: the adapted model's completions, scored beside the base model's;
- `score_benchmarks_after`: lm-evaluation-harness tasks on the adapted model, beside the base model's scores;
- `time`: inference latency unmerged, bypassed and merged;
- `save`: the adapter.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from peftlab.files import exclusive
from peftlab.models.load import attention_kernel, cache_dir, seeded_weights
from peftlab.plans.extras import save_extras
from peftlab.tasks.kinds import task_kind
from peftlab.tasks.prepare import collate, collate_indexed
from peftlab.train import benchmarks, distributed
from peftlab.train.batching import Batches
from peftlab.train.benchmarks import SAMPLES_FILE as BENCHMARK_SAMPLES
from peftlab.train.benchmarks import BenchmarkScores, score_benchmarks, write_benchmark_samples
from peftlab.train.context import RunContext
from peftlab.train.device import PeakMemory, peak_memory, reset_peak_memory
from peftlab.train.generation import (
    SAMPLES_FILE,
    Completions,
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
from peftlab.train.sharding import state_dict_read_as
from peftlab.train.speed import switched_on
from peftlab.train.speed.base import RunSetting, installed

Batch = dict[str, torch.Tensor]
INIT_BATCHES = 16  # training batches a data-driven init reads
LATENCY_SEED = 0  # not the training seed: every configuration and seed of a study times the same batches


@dataclass
class HeldOut:
    validation: list[Batch]
    test: list[Batch]  # none where the run does not evaluate the test split (a study's tuning runs)
    forgetting: list[Batch]
    timed: list[Batch]  # the latency sample


@dataclass
class References:
    """The base model's, before training: what a run that learned nothing would score."""

    test_loss: float | None  # a causal LM keeps its starting loss when it learns nothing
    forgetting_loss: float | None
    completions: Completions | None
    benchmarks: BenchmarkScores | None = None


@dataclass
class Trained:
    loop: LoopResult
    memory: PeakMemory  # the training peak, before evaluation adds its own
    speed: dict[str, dict[str, Any] | None]  # feature -> what it did
    features: list[Any]  # installed speed features (removed before generation and timing)


def held_out(ctx: RunContext) -> HeldOut:
    spec, data, pad_id = ctx.train, ctx.run.data, ctx.run.pad_id
    return HeldOut(eval_batches(data.validation, spec.eval_batch_size, pad_id),
                   eval_batches(data.test, spec.eval_batch_size, pad_id) if spec.evaluate_test else [],
                   eval_batches(ctx.run.forgetting, spec.eval_batch_size, pad_id) if ctx.run.forgetting else [],
                   latency_sample(data.test or data.validation, spec.latency_batches, spec.eval_batch_size, pad_id))


def prepare(ctx: RunContext, batches: HeldOut) -> References:
    """Methods that start from the data (EVA) see the first training examples before any speed feature changes
    the forward; then the base model's references."""
    data, size, pad_id = ctx.run.data, ctx.train.batch_size, ctx.run.pad_id
    ctx.method.initialize(ctx.model, ctx.on_device(initial_batches(data.train, size, pad_id)),
                          held_out=ctx.on_device(initial_batches(data.validation, size, pad_id)))
    with ctx.forward_only():
        test_loss = _base_loss(ctx, batches.test) if task_kind(data.kind).generates else None
        forgetting_loss = _base_loss(ctx, batches.forgetting)
        wanted = ctx.run.config.eval.benchmarks
        score_base = bool(wanted and wanted.base and benchmarks_apply(ctx))
        completions = scored = None
        if ctx.run.prompts or score_base:
            with ctx.gathered():  # the main process's work (with sharded layers, every process gathers them)
                if distributed.is_main():
                    completions = _base_completions(ctx) if ctx.run.prompts else None
                    scored = _base_benchmarks(ctx) if score_base else None
    return References(test_loss, forgetting_loss, completions, scored)


def benchmarks_apply(ctx: RunContext) -> bool:
    """The run scores `eval.benchmarks` (in its main process): it has some and evaluates its test data (a tuning
    run does not)."""
    return ctx.run.config.eval.benchmarks is not None and ctx.train.evaluate_test


def train(ctx: RunContext, batches: HeldOut) -> Trained:
    spec, data, pad_id, accelerator = ctx.train, ctx.run.data, ctx.run.pad_id, ctx.accelerator
    lengths = [len(e["input_ids"]) for e in data.train]
    sampler = Batches(lengths, spec.batch_size, spec.seed, bucketed=spec.batching == "bucketed")
    loader = DataLoader(range(len(data.train)), batch_sampler=sampler,
                        collate_fn=partial(collate_indexed, examples=data.train, pad_id=pad_id,
                                           packed=spec.batching == "packed"))

    def on_eval(step: int) -> None:
        ctx.record({"step": step, "split": "validation", **ctx.evaluate(batches.validation)})

    reset_peak_memory(accelerator.device.type)
    setting = RunSetting(data.kind, data.train, data.cache_file.stem, pad_id, spec.eval_batch_size, accelerator.device,
                         accelerator.autocast, accelerator.mixed_precision, spec.batching, ctx.sharding is not None)
    features, speed = installed(switched_on(spec), ctx.model, ctx.method, setting)
    checkpoints = ctx.checkpoints()
    loop = train_loop(ctx.model, ctx.method, loader, data.kind, ctx.run.total_steps, spec, accelerator, ctx.record,
                      on_eval, features, checkpoints)
    if checkpoints.every or loop.resumed_from:
        speed["checkpoint"] = {"every": checkpoints.every, "resumed_from_step": loop.resumed_from}
    if not loop.failure and not loop.stopped:
        checkpoints.remove()  # the adapter is saved with the result; optimizer state is not kept
    return Trained(loop, peak_memory(ctx.memory_before, accelerator.device.type), speed, features)


def evaluate(ctx: RunContext, batches: HeldOut, references: References, steps: int) -> dict[str, dict[str, Any]]:
    """split -> metrics after training: each held-out split, the validation curve, the forgetting probe."""
    metrics: dict[str, dict[str, Any]] = {}
    for name, split in (("validation", batches.validation), ("test", batches.test)):
        if split:
            metrics[name] = ctx.evaluate(split)
            ctx.record({"step": steps, "split": name, **metrics[name]})
    metrics.update(validation_curve(ctx.partial_dir / "metrics.jsonl", ctx.train.eval_at, ctx.run.total_steps))
    if references.test_loss is not None and "test" in metrics:
        metrics["test"]["base_loss"] = references.test_loss
    if batches.forgetting:
        loss = ctx.evaluate(batches.forgetting)
        metrics["forgetting"] = {"base_loss": references.forgetting_loss, "loss": loss["loss"],
                                 "increase": loss["loss"] - references.forgetting_loss, "count": loss["count"]}
    return metrics


def generate_completions(ctx: RunContext, references: References) -> dict[str, Any]:
    """Complete the test prompts with the adapted model (merged where the method merges, as it would be served),
    score the completions (and the base model's), write the samples file; the mean scores under `scores`, the
    rest for the run's costs."""
    run, method, accelerator = ctx.run, ctx.method, ctx.accelerator
    prompts, spec, base = run.prompts, run.config.eval.generate, references.completions
    with method.merged(ctx.model) if method.mergeable else nullcontext(ctx.model) as serving:
        adapted = generate(serving, prompts, spec, run.tokenizer, accelerator.device, accelerator.autocast,
                           method.complete)
    adapted_scores = score(adapted.texts, prompts.references)
    base_scores = score(base.texts, prompts.references) if base is not None else None
    write_samples(ctx.partial_dir / SAMPLES_FILE, prompts, adapted, adapted_scores, base, base_scores)
    scores = {**adapted_scores.means(), "generated": len(adapted.texts),
              "mean_new_tokens": sum(adapted.new_tokens) / max(len(adapted.new_tokens), 1)}
    if base_scores is not None:
        scores.update(base_scores.means("base_"))
    return {"scores": scores, "generation_seconds": adapted.seconds, "generated_tokens": sum(adapted.new_tokens),
            "generation_tokens_per_second": adapted.tokens_per_second}


def score_benchmarks_after(ctx: RunContext, references: References) -> dict[str, Any]:
    """`eval.benchmarks` on the adapted model as it would be served (merged where the method merges), beside the
    base model's scores (`base_<metric>`); the samples file written; the scores under `scores`, the rest for the
    run's costs and data."""
    spec, method = ctx.run.config.eval.benchmarks, ctx.method
    with method.merged(ctx.model) if method.mergeable else nullcontext(ctx.model) as serving:
        adapted = score_benchmarks(serving, ctx.run.tokenizer, spec, ctx.accelerator.device)
    base = references.benchmarks
    write_benchmark_samples(ctx.partial_dir / BENCHMARK_SAMPLES, adapted, base)
    scores = {task: dict(values) for task, values in adapted.scores.items()}
    for task, values in (base.scores if base else {}).items():
        scores.setdefault(task, {}).update({f"base_{name}": value for name, value in values.items()})
    return {"scores": scores, "versions": adapted.versions, "benchmark_seconds": adapted.seconds}


@torch.no_grad()
def time_inference(ctx: RunContext, batches: list[Batch]) -> dict[str, float]:
    """Milliseconds per batch, at the training's precision: unmerged, as the bare base where the method can be
    bypassed (its overhead), and merged where it merges."""
    if not batches:
        return {}
    model, method, kind, device = ctx.model, ctx.method, ctx.run.data.kind, ctx.accelerator.device
    on_device = ctx.on_device(batches)
    forward = partial(batch_nll, model, kind=kind, hidden_states=method.hidden_states)
    was_training = model.training
    model.eval()
    with ctx.accelerator.autocast():
        timings = {"unmerged": latency_ms(forward, on_device, device)}
        bypass = method.bypassed(model)
        if bypass is not None:
            with bypass:
                timings["base"] = latency_ms(forward, on_device, device)
        if method.mergeable:
            with method.merged(model) as merged:
                timings["merged"] = latency_ms(partial(batch_nll, merged, kind=kind, hidden_states=method.hidden_states),
                                               on_device, device)
    model.train(was_training)
    return timings


def save(ctx: RunContext, state: dict[str, torch.Tensor] | None = None) -> int:
    """The adapter's size on disk, once saved in the run's directory; `state`: the gathered state dict of a
    sharded model (`RunContext.state_to_save`), read in place of the model's own."""
    with state_dict_read_as(ctx.model, state) if state is not None else nullcontext():
        ctx.method.save(ctx.model, ctx.partial_dir / "adapter")
    save_extras(ctx.model, ctx.run.plan.extra, ctx.partial_dir / "adapter")
    return directory_bytes(ctx.partial_dir / "adapter")


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


def initial_batches(split: list[dict[str, Any]], size: int, pad_id: int) -> list[Batch]:
    """The batches `Method.initialize` reads: the first `INIT_BATCHES` batches' worth of a split's examples (the
    training split's, and the validation split's for its held-out checks), sorted by length."""
    return eval_batches(split[: INIT_BATCHES * size], size, pad_id)


def eval_batches(split: list[dict[str, Any]], size: int, pad_id: int) -> list[Batch]:
    """Batches sorted by length (little padding): evaluation metrics do not depend on the order."""
    ordered = sorted(split, key=lambda e: len(e["input_ids"]))
    return [collate(ordered[i : i + size], pad_id) for i in range(0, len(ordered), size)]


def latency_sample(split: list[dict[str, Any]], batches: int, size: int, pad_id: int) -> list[Batch]:
    """`batches` batches of `size` examples drawn at random (a fixed draw) from `split`: requests as a server
    meets them, of representative length, unlike the sorted evaluation batches whose first are the shortest."""
    count = min(len(split), batches * size)
    chosen = random.Random(LATENCY_SEED).sample(range(len(split)), count)
    return [collate([split[i] for i in chosen[j : j + size]], pad_id) for j in range(0, count, size)]


def mean_length(batches: list[Batch]) -> float | None:
    """Padded positions per example over the timed batches."""
    return sum(b["input_ids"].shape[1] for b in batches) / len(batches) if batches else None


def _base_loss(ctx: RunContext, batches: list[Batch]) -> float | None:
    """Loss before training: the base model's (adapters whose initialization changes the output, such as
    prefixes, are bypassed; a zero-initialized LoRA already computes the base)."""
    if not batches:
        return None
    bypass = ctx.method.bypassed(ctx.model)
    with bypass if bypass is not None else nullcontext():
        return ctx.evaluate(batches)["loss"]


def _base_benchmarks(ctx: RunContext) -> BenchmarkScores:
    """The base model's benchmark scores, before training, adapters that change the output bypassed; cached by
    what sets the base's weights (as the base completions are) and the benchmark settings."""
    run, accelerator = ctx.run, ctx.accelerator
    file = cache_dir() / "benchmarks" / f"{benchmarks.base_key(_base_identity(ctx), run.config.eval.benchmarks)}.json"
    return _cached_on_base(ctx, file, benchmarks.read_cached, benchmarks.write_cached, lambda: score_benchmarks(
        ctx.model, run.tokenizer, run.config.eval.benchmarks, accelerator.device))


def _base_identity(ctx: RunContext) -> dict[str, Any]:
    """Everything that sets the base model's weights and how it computes: the files', the seed of a model built
    from a config, and what the method does to them (`Method.base_identity`)."""
    run, accelerator = ctx.run, ctx.accelerator
    return {"model": run.model.model_dump(mode="json"), "weights": run.inputs.get("model"),
            "weights_seed": run.config.train.seed if seeded_weights(run.model) else None,
            "method": run.method.name, "quantization": ctx.method.base_identity(),
            "precision": accelerator.mixed_precision, "device": accelerator.device.type,
            "attention": attention_kernel(ctx.model)}


def _base_completions(ctx: RunContext) -> Completions | None:
    """The base model's completions of the test prompts, before training (adapters that change the output at
    initialization are bypassed). Cached: every run of a study on the same base computes the same ones; the key
    holds everything that sets the base's weights (the files', the seed of a model built from a config, and
    what the method does to them: `Method.base_identity`)."""
    run, method, accelerator = ctx.run, ctx.method, ctx.accelerator
    spec = run.config.eval.generate
    if not spec.base:
        return None
    file = cache_dir() / "generations" / f"{base_cache_key(_base_identity(ctx), run.prompts, spec)}.json"
    return _cached_on_base(ctx, file, read_cached, write_cached, lambda: generate(
        ctx.model, run.prompts, spec, run.tokenizer, accelerator.device, accelerator.autocast, method.complete))


def _cached_on_base(ctx: RunContext, file: Path, read: Callable[[Path], Any], write: Callable[[Path, Any], None],
                    compute: Callable[[], Any]) -> Any:
    """`file`'s contents, else `compute()` on the base model (adapters that change the output bypassed), written
    there. Under a lock: of a study's runs started together, one computes and the others wait and read it."""
    with exclusive(file):
        if (cached := read(file)) is not None:
            return cached
        bypass = ctx.method.bypassed(ctx.model)
        with bypass if bypass is not None else nullcontext():
            computed = compute()
        write(file, computed)
    return computed
