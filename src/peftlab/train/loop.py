"""The training loop: AdamW, warmup then decay, clipping, accumulation, autocast, NaN guard."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader
from transformers import get_scheduler

from peftlab.methods.base import Method
from peftlab.train import distributed
from peftlab.train.checkpoint import Checkpoints
from peftlab.train.loss import batch_nll
from peftlab.train.sharding import clip_gradients, is_sharded, whole
from peftlab.train.speed.base import SpeedFeature, batch_context


@dataclass
class LoopResult:
    steps: int
    train_seconds: float  # optimizer steps only; evaluation time excluded
    train_tokens: int  # non-padding tokens seen in training
    train_positions: int  # padded positions computed (tokens + padding)
    final_loss: float  # mean training loss over the last log window
    failure: str | None = None
    resumed_from: int = 0  # the checkpoint's step a resumed run started after (0: from the start)
    stopped: bool = False  # at `train.stop_at`, its state saved to resume from


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, or one of bitsandbytes' 8-bit / paged variants (paged state moves to CPU memory under
    GPU memory pressure instead of failing; on a CPU it is ordinary memory)."""
    if name == "adamw":
        return torch.optim.AdamW(groups)
    from peftlab.models.quantize import bnb_module

    optim = bnb_module().optim
    return {"adamw-8bit": optim.AdamW8bit, "paged-adamw": optim.PagedAdamW,
            "paged-adamw-8bit": optim.PagedAdamW8bit}[name](groups)


def forever(loader: DataLoader) -> Iterator[dict]:
    while True:  # each pass reshuffles with the loader's seeded generator
        yield from loader


def evaluation_steps(spec, total_steps: int) -> set[int]:
    """The steps before the last at which the validation split is evaluated: every `eval_every`, and each
    fraction of `eval_at` (rounded to a step)."""
    steps = set(range(spec.eval_every, total_steps, spec.eval_every)) if spec.eval_every else set()
    steps |= {max(1, round(f * total_steps)) for f in spec.eval_at or ()}
    return {s for s in steps if s < total_steps}


def train_loop(
    model: torch.nn.Module,
    method: Method,
    loader: DataLoader,
    kind: str,
    total_steps: int,
    spec,  # TrainSpec
    accelerator: Accelerator,
    on_log: Callable[[dict], None],
    on_eval: Callable[[int], None],
    features: Sequence[SpeedFeature] = (),
    checkpoints: Checkpoints | None = None,
) -> LoopResult:
    """Batches carry their examples' `index` (for speed features such as the prefix cache); the model never
    sees it. Each micro-batch runs in the context of every installed speed feature. With `checkpoints`, the
    loop resumes after the latest one, saves one every `train.checkpoint_every` steps, and at
    `train.stop_at` (before the last step) saves one and stops: the schedule is the full run's."""
    optimizer = make_optimizer(spec.optimizer, method.param_groups(model, spec.lr, spec.weight_decay))
    scheduler = get_scheduler(spec.schedule, optimizer, round(spec.warmup_ratio * total_steps), total_steps)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip = clip_gradients if is_sharded(model) else accelerator.clip_grad_norm_
    evaluations = evaluation_steps(spec, total_steps)
    batches = forever(loader)
    model.train()
    totals = _resume(checkpoints, batches, spec.grad_accum, model, optimizer, scheduler)
    first = totals.resumed_from + 1
    stop = max(1, round(spec.stop_at * total_steps)) if spec.stop_at and checkpoints is not None else None
    stop = stop if stop is not None and first - 1 <= stop < total_steps else None  # resumed at it: stops at once
    with _progress() as progress:
        bar = progress.add_task("train", total=total_steps, completed=first - 1, loss=totals.final_loss, tps=0.0)
        for step in range(first, (stop or total_steps) + 1):
            start = time.perf_counter()
            step_loss = 0.0
            for _ in range(spec.grad_accum):  # micro-batches of one optimizer step
                value = _micro_batch(next(batches), model, method, kind, spec.grad_accum, accelerator, features, totals)
                if not math.isfinite(value):
                    return LoopResult(step - 1, totals.seconds, totals.tokens, totals.positions, float("nan"),
                                      f"non-finite loss ({value}) at step {step}")
                step_loss += value
            distributed.sum_gradients(whole(trainable))  # a sharded layer's are summed by its reduce-scatter
            if spec.max_grad_norm:
                clip(trainable, spec.max_grad_norm)
            optimizer.step()
            scheduler.step()
            method.on_step(model, step, total_steps)  # before zero_grad: AdaLoRA reads the gradients
            optimizer.zero_grad(set_to_none=True)
            totals.seconds += time.perf_counter() - start
            totals.window.append(step_loss)
            progress.update(bar, advance=1, loss=step_loss, tps=totals.tokens / totals.seconds)
            if step % spec.log_every == 0 or step == total_steps:
                on_log({"step": step, "train_loss": sum(totals.window) / len(totals.window),
                        "lr": scheduler.get_last_lr()[0], "tokens_per_second": totals.tokens / totals.seconds})
                totals.final_loss, totals.window = sum(totals.window) / len(totals.window), []
            if step in evaluations:
                on_eval(step)
            if checkpoints is not None and (checkpoints.due(step, total_steps) or step == stop):
                checkpoints.save(step, model, optimizer, scheduler, totals.state())
    return LoopResult(stop or total_steps, totals.seconds, totals.tokens, totals.positions, totals.final_loss,
                      resumed_from=first - 1, stopped=stop is not None)


def _progress() -> Progress:
    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, transient=True, disable=not distributed.is_main())


@dataclass
class _Totals:
    """What the loop has counted so far (a checkpoint keeps it)."""

    seconds: float = 0.0
    tokens: int = 0
    positions: int = 0
    window: list[float] = field(default_factory=list)  # step losses since the last log row
    final_loss: float = float("nan")
    resumed_from: int = 0

    def state(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "tokens": self.tokens, "positions": self.positions, "window": self.window,
                "final_loss": self.final_loss}


def _resume(checkpoints: Checkpoints | None, batches: Iterator[dict], grad_accum: int, model, optimizer,
            scheduler) -> _Totals:
    """The totals at the latest checkpoint, with the model, optimizer and scheduler restored to it and the
    batches it trained on drawn; fresh totals without one."""
    done = checkpoints.latest_step() if checkpoints is not None else 0
    if not done:
        return _Totals()
    for _ in range(done * grad_accum):  # the batches already trained on (the sampler is seeded);
        next(batches)  # drawn before the generators are restored: a new epoch's loader draws a seed
    state = checkpoints.restore(model, optimizer, scheduler)
    return _Totals(state["seconds"], state["tokens"], state["positions"], state["window"], state["final_loss"], done)


def _micro_batch(drawn: dict, model, method: Method, kind: str, grad_accum: int, accelerator: Accelerator,
                 features: Sequence[SpeedFeature], totals: _Totals) -> float:
    """Forward and backward of one micro-batch (this process's rows of the global batch); its loss, summed over
    the processes. A non-finite loss is returned before any gradient is taken."""
    batch, has_rows = distributed.shard(drawn)
    index = batch.pop("index")
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    length = batch["input_ids"].shape[1]
    method.prepare_batch(batch)
    with accelerator.autocast(), batch_context(features, index, length, accelerator.device):
        nll, count, _ = batch_nll(model, batch, kind, method.hidden_states)
    mask = batch["attention_mask"]
    # each process divides by the count of the whole global micro-batch, so the gradients summed over
    # the processes are those of the mean over all of its predictions
    local = [float(count), float(mask.sum()), float(mask.numel())] if has_rows else [0.0] * 3
    total_count, batch_tokens, batch_positions = distributed.sum_across(local)
    loss = nll / total_count if has_rows else nll * 0.0
    penalty = method.regularization(model)
    if penalty is not None:  # every process adds it, and their gradients are summed
        loss = loss + penalty / distributed.process_count()
    loss = loss / grad_accum
    value = distributed.sum_across([loss.item()])[0]  # the same on every process: they stop together
    if not math.isfinite(value):
        return value
    accelerator.backward(loss)
    totals.tokens += int(batch_tokens)
    totals.positions += int(batch_positions)
    return value
