"""Importance probes: load the run's model and task, measure every site of the placement, cache the scores.

gradient, fisher and activation read the pretrained model (dropout off, a fresh task head from the probe
seed) on `steps` training batches without changing it; update and adalora train a uniform-rank LoRA /
AdaLoRA on the placement for `steps` optimizer steps and read what it learned. Scores are written as JSON
(`{"sites": [{layer, role, path, score, ...}]}`), the format `from-scores` reads, and cached per model, task,
placement and probe settings, so every run of a study shares one probe.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.progress import track
from torch import nn
from torch.utils.data import DataLoader

from peftlab.errors import PeftlabError
from peftlab.files import write_atomic
from peftlab.importance.measures import (
    GRADIENT_SCORES,
    InputCovariance,
    base_linear,
    pooled_ranks,
    site_matrix,
    update_spectrum,
)
from peftlab.methods.registry import make_method
from peftlab.methods.specs import AdaLoraSpec, LoraSpec
from peftlab.models.load import (
    cache_dir,
    check_lengths,
    head_modules,
    load_model,
    load_tokenizer,
    model_spec_for_task,
    unwrap,
)
from peftlab.plans.allocation import (
    MEASURES,
    BudgetAllocation,
    ImportanceAllocation,
    UniformAllocation,
    check_measure,
)
from peftlab.plans.plan import Plan, plan_on
from peftlab.specs import PlanSpec, RunConfig, TrainSpec
from peftlab.tasks.kinds import task_kind
from peftlab.tasks.prepare import collate_indexed, load_task
from peftlab.train.batching import Batches
from peftlab.train.device import choose_device
from peftlab.train.loop import train_loop
from peftlab.train.loss import batch_nll

VERSION = 1  # bump when a measure changes, so cached scores are recomputed
# Training settings the update / adalora probes train with (the rest of a run's settings do not matter to them).
PROBE_TRAINING = ("batch_size", "batching", "grad_accum", "lr", "weight_decay", "optimizer", "schedule", "warmup_ratio",
                  "max_grad_norm", "precision")


def importance_scores(config: RunConfig, measure: str, rank: float = 8.0, steps: int = 64, seed: int = 0) -> Path:
    """The scores file (JSON) of `measure` on the config's model, task and placement; probed once, then cached."""
    check_measure(measure)
    settings = {"measure": measure, "rank": rank, "steps": steps, "seed": seed, "batch_size": config.train.batch_size,
                "lr": config.train.lr, "version": VERSION}
    # What the probe reads: not the run's own seed or length, so every seed of a study shares one probe.
    training = config.train.model_dump(mode="json", include=set(PROBE_TRAINING))
    key = {"model": config.model.model_dump(mode="json"), "task": config.task.model_dump(mode="json"),
           "placement": config.plan.placement.model_dump(mode="json"), "alpha": config.plan.alpha.model_dump(mode="json"),
           "training": training, **settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "importance" / f"{measure}-{digest}.json"
    if path.is_file():
        return path
    result = probe(config, measure, rank, steps, seed)
    result["probe"] = settings
    write_atomic(path, json.dumps(result, indent=1) + "\n")
    return path


def resolve_importance(config: RunConfig) -> tuple[RunConfig, Path | None]:
    """`config` with an `importance(...)` allocation (alone or as a budget's shape) pointed at its scores."""
    allocation = config.plan.allocation
    inner = allocation.shape_ if isinstance(allocation, BudgetAllocation) else allocation
    if not isinstance(inner, ImportanceAllocation) or inner.scores is not None:
        return config, None
    path = importance_scores(config, inner.measure, inner.rank, inner.steps, inner.seed)
    inner = inner.model_copy(update={"scores": path})
    if isinstance(allocation, BudgetAllocation):
        inner = allocation.model_copy(update={"shape_": inner})
    return config.model_copy(update={"plan": config.plan.model_copy(update={"allocation": inner})}), path


def probe(config: RunConfig, measure: str, rank: float, steps: int, seed: int) -> dict[str, Any]:
    """Measure every site of the config's placement; returns the scores record (not cached)."""
    start = time.perf_counter()
    set_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    check_lengths(config.model, config.task.max_length)
    tokenizer = load_tokenizer(config.model)
    data = load_task(config.task, tokenizer)
    model_spec = model_spec_for_task(config.model, task_kind(data.kind).head, task_kind(data.kind).num_labels(data.labels))
    model = load_model(model_spec, seed=seed)
    uniform = PlanSpec(placement=config.plan.placement, allocation=UniformAllocation(rank=max(1, round(rank))),
                       alpha=config.plan.alpha)
    plan = plan_on(model_spec, uniform)
    lengths = [len(e["input_ids"]) for e in data.train]
    loader = DataLoader(range(len(data.train)), batch_sampler=Batches(lengths, config.train.batch_size, seed, bucketed=False),
                        collate_fn=partial(collate_indexed, examples=data.train, pad_id=tokenizer.pad_token_id))
    device = torch.device(choose_device(config.train.device))
    kind = MEASURES[measure].probe
    if kind == "training":
        rows = training_probe(model, plan, loader, data.kind, measure, steps, config.train, seed)
    else:
        batches = _batches(loader, steps, device)
        rows = (gradient_probe(model.to(device), plan, batches, data.kind, measure) if kind == "gradient" else
                activation_probe(model.to(device), plan, batches, data.kind, rank))
    sites = [{"layer": p.site.layer, "role": p.site.role.value, "path": p.site.key, **row} for p, row in zip(plan.sites, rows)]
    return {"measure": measure, "model": model_spec.name, "model_type": plan.model_type, "n_layers": plan.n_layers,
            "task": config.task.name or str(config.task.path or config.task.dataset), "seconds": time.perf_counter() - start,
            "sites": sites}


def _batches(loader: DataLoader, steps: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches, passing over the data again (reshuffled) when it runs out."""
    count = 0
    while True:
        for batch in loader:
            if count == steps:
                return
            batch.pop("index")
            count += 1
            yield {k: v.to(device) for k, v in batch.items()}


def _site_weights(model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """Module path -> frozen weight, for every planned site (a fused module once)."""
    return {p.site.path: base_linear(model.get_submodule(p.site.path)).weight for p in plan.sites}


def gradient_probe(model: nn.Module, plan: Plan, batches, kind: str, measure: str) -> list[dict[str, float]]:
    """Gradients of the mean loss with respect to the site weights, batch by batch; nothing is updated."""
    model.eval()  # dropout off: the same batches give the same scores
    weights = _site_weights(model, plan)
    for param in model.parameters():
        param.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    scores = GRADIENT_SCORES[measure]()
    for batch in track(list(batches), description=f"probe ({measure})", transient=True):
        nll, count, _ = batch_nll(model, batch, kind)
        grads = torch.autograd.grad(nll / count, list(weights.values()), allow_unused=True)
        for (name, weight), grad in zip(weights.items(), grads):
            scores.update(name, weight.detach(), torch.zeros_like(weight) if grad is None else grad)
    return [scores.site_scores(p.site.path, p.site) for p in plan.sites]


def activation_probe(model: nn.Module, plan: Plan, batches, kind: str, rank: float) -> list[dict[str, float]]:
    """Covariance of each site's input over non-padding tokens; scores pooled across sites as in EVA."""
    model.eval()
    modules = {p.site.path: base_linear(model.get_submodule(p.site.path)) for p in plan.sites}
    stats = {p.site.path: InputCovariance(p.site.in_features) for p in plan.sites}
    mask: list[torch.Tensor] = []

    def record(path: str, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        stats[path].update(inputs[0][mask[0]].cpu())  # (N, in): the batch's real tokens

    hooks = [m.register_forward_pre_hook(partial(record, path)) for path, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in track(list(batches), description="probe (activation)", transient=True):
                mask[:] = [batch["attention_mask"].bool()]
                batch_nll(model, batch, kind)
    finally:
        for hook in hooks:
            hook.remove()
    ratios = [stats[p.site.path].explained_variance() for p in plan.sites]
    top = max(1, round(rank))
    return [{"score": float(count), "explained_top_r": float(r[:top].sum())}
            for count, r in zip(pooled_ranks(ratios, rank), ratios)]


def training_probe(model: nn.Module, plan: Plan, loader: DataLoader, kind: str, measure: str, steps: int,
                   settings: TrainSpec, seed: int) -> list[dict[str, float]]:
    """Train LoRA (update) or AdaLoRA (adalora) at the plan's uniform rank; read the updates or final ranks."""
    before = {p.site.key: site_matrix(base_linear(model.get_submodule(p.site.path)).weight, p.site).detach().clone()
              for p in plan.sites}
    spec = LoraSpec() if measure == "update" else AdaLoraSpec()
    method = make_method(spec, steps)
    model = method.apply(model, plan, head_modules(model))
    train = settings.model_copy(update={"seed": seed, "max_steps": steps, "log_every": steps, "eval_every": 0})
    accelerator = Accelerator(cpu=choose_device(settings.device) == "cpu")
    model.to(accelerator.device)
    result = train_loop(model, method, loader, kind, steps, train, accelerator, lambda row: None, lambda step: None)
    if result.failure:
        raise PeftlabError(f"importance probe ({measure}): training failed: {result.failure}")
    if measure == "adalora":
        ranks = method.report(model)["final_ranks"]
        return [{"score": float(ranks.get(p.site.path, 0))} for p in plan.sites]
    rows = []
    with method.merged(model) as merged:
        base = unwrap(merged)
        for p in plan.sites:
            after = site_matrix(base_linear(base.get_submodule(p.site.path)).weight, p.site).detach().cpu()
            spectrum = update_spectrum(after - before[p.site.key], p.rank)
            rows.append({"score": spectrum["effective_rank"], **spectrum})
    return rows


def write_scores(record: dict[str, Any], folder: Path) -> list[Path]:
    """`importance-<measure>.json` and `.csv` in `folder`."""
    stem = folder / f"importance-{record['measure']}"
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    write_atomic(json_path, json.dumps(record, indent=1) + "\n")
    columns = list(dict.fromkeys(k for row in record["sites"] for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(record["sites"])
    write_atomic(csv_path, text.getvalue())
    return [json_path, csv_path]
