"""A run's context, built once and read by each of its phases (`train.phases`): the resolved run, the model with
the method applied, the accelerator at the run's precision, the run's directory and its metrics history."""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import nn

from peftlab.methods.base import Method, trainable_counts
from peftlab.methods.registry import make_method
from peftlab.models.load import attention_kernel, count_params, head_modules, load_model, unwrap
from peftlab.models.quantize import DTYPES, weight_bytes
from peftlab.plans.extras import train_extras
from peftlab.train.checkpoint import Checkpoints
from peftlab.train.device import (
    Backends,
    attention_implementation,
    choose_device,
    cpu_has_bf16,
    memory_in_use,
    mixed_precision,
)
from peftlab.train.evaluate import evaluate
from peftlab.train.sharding import Sharding, full_state_dict, gathered, shard

if TYPE_CHECKING:
    from peftlab.resolve.resolved import ResolvedRun
    from peftlab.specs import TrainSpec

Batches = list[dict[str, torch.Tensor]]


@dataclass
class RunContext:
    run: ResolvedRun
    model: nn.Module  # with the method applied, on the accelerator's device
    method: Method
    accelerator: Accelerator
    partial_dir: Path  # where the run writes until it ends (`train.run.execute_run`)
    memory_before: int  # bytes in use before the model loaded (imports and data: not what training costs)
    base_params: int
    head: list[str]  # the task head's modules
    counts: dict[str, int]  # trainable parameters: the method's own ("adapter") and the head's
    frozen: dict[str, int]  # frozen weight bytes ("quantized", "other") and "quantized_params"
    record: Callable[[dict[str, Any]], None] = lambda row: None  # a row of metrics.jsonl (and the trackers)
    # the attention kernel of forward-only phases where it differs from training's (`forward_only`)
    forward_attention: str | None = None
    sharding: Sharding | None = None  # the layer blocks split over the processes (`train.sharding: fsdp`)

    @property
    def train(self) -> TrainSpec:
        return self.run.config.train

    def evaluate(self, batches: Batches) -> dict[str, float]:
        """A split's metrics at the training's precision, through the method's forward."""
        data = self.run.data
        with self.forward_only():
            return evaluate(self.model, batches, kind=data.kind, n_labels=len(data.labels),
                            device=self.accelerator.device, autocast=self.accelerator.autocast,
                            hidden_states=self.method.hidden_states, lockstep=self.sharding is not None)

    def gathered(self) -> AbstractContextManager:
        """The main process's own work on the model (every process enters): with sharded layers, their full
        weights gathered on every process until the main process is done (`sharding.gathered`)."""
        return gathered(self.sharding)

    def state_to_save(self) -> dict[str, torch.Tensor] | None:
        """With sharded layers, what the main process saves: the full state dict of what was trained (the
        whole model for full fine-tuning), gathered from every process, which all call it; None otherwise."""
        return None if self.sharding is None else full_state_dict(self.model)

    @contextmanager
    def forward_only(self) -> Iterator[None]:
        """Evaluation, generation and timing (no backward pass): with `forward_attention` where it is set (auto
        trains with eager attention on a CPU under bf16 for its backward pass; its forward passes keep
        transformers' sdpa, whose fused kernel is slow only in its backward pass), then back to the training's kernel."""
        model, training = unwrap(self.model), attention_kernel(self.model)
        if self.forward_attention is None or training == self.forward_attention:
            yield
            return
        model.set_attn_implementation(self.forward_attention)
        try:
            yield
        finally:
            model.set_attn_implementation(training)

    def on_device(self, batches: Batches) -> Batches:
        return [{k: v.to(self.accelerator.device) for k, v in b.items()} for b in batches]

    def checkpoints(self) -> Checkpoints:
        return checkpoints_for(self.run, self.partial_dir)

    def environment(self) -> dict[str, Any]:
        """The machine and versions the run used (recorded, not part of what decides reuse)."""
        from peftlab.provenance import device_identity, versions

        found, accelerator, model = versions(), self.accelerator, self.model
        return {
            "device": str(accelerator.device),
            **device_identity(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            **{name: found[name] for name in ("torch", "transformers", "peft")},
            "versions": found,
            "model_commit": getattr(getattr(unwrap(model), "config", None), "_commit_hash", None),  # a Hub model's
            "attn_implementation": attention_kernel(model),  # training's; evaluation's and generation's:
            "attn_implementation_forward": self.forward_attention or attention_kernel(model),
            "mixed_precision": accelerator.mixed_precision,
            "processes": accelerator.num_processes,  # train.batch_size is the global batch
            "sharding": self.sharding.report() if self.sharding else None,  # what each process held
        }


def checkpoints_for(run: ResolvedRun, partial_dir: Path) -> Checkpoints:
    """Where the run saves its training state: every `train.checkpoint_every` steps (0: never), at
    `train.stop_at`; where a run resumes from, whether it saves or not (a run stopped at a rung resumes
    without either)."""
    return Checkpoints(partial_dir / "checkpoint", run.config.train.checkpoint_every)


def build(run: ResolvedRun, partial_dir: Path) -> RunContext:
    """The build phase: seeds, an accelerator at the run's precision, the model loaded and the method applied."""
    spec = run.config.train
    set_seed(spec.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # accelerate keeps one precision per process; a run sets its own (runs of one process may differ).
    # The process-wide distributed state (PartialState) is kept.
    AcceleratorState._reset_state()
    device = choose_device(spec.device)  # the method's support for it was checked by `resolve_run`
    # split_batches: train.batch_size is the global batch, shared out over the processes (train.distributed), so
    # the prepared scheduler steps once per optimizer step, not once per process
    mixed = precision(spec.precision, device)
    accelerator = Accelerator(mixed_precision=mixed, cpu=device == "cpu",
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    memory_before = memory_in_use(device)
    attention = attention_implementation(run.model.attn_implementation, device, mixed)
    model = load_model(run.model, seed=spec.seed, dtype=DTYPES[run.model.dtype], attn_implementation=attention)
    # auto's eager is for the backward pass: forward-only phases keep sdpa where the model has it
    forward = "sdpa" if (run.model.attn_implementation == "auto" and attention == "eager"
                         and getattr(model, "_supports_sdpa", False)) else None
    base_params = count_params(model)
    head = head_modules(model)
    method = make_method(run.method, run.total_steps)
    model = method.apply(model, run.plan, head).to(accelerator.device)
    train_extras(model, run.plan.extra)  # the plan's biases and norms, under the method's wrappers
    counts, frozen = trainable_counts(model, head), weight_bytes(model)  # of the whole model, before sharding
    sharding = shard(model, accelerator.device) if spec.sharding == "fsdp" else None
    return RunContext(run, model, method, accelerator, partial_dir, memory_before, base_params, head, counts, frozen,
                      forward_attention=forward, sharding=sharding)


def precision(requested: str, device: str) -> str:
    """accelerate's mixed precision for `train.precision` on `device` (see `device.mixed_precision`); a warning
    where bf16 autocast is asked for on a CPU without bf16 instructions."""
    cpu_bf16 = cpu_has_bf16()
    if device == "cpu" and requested == "bf16" and not cpu_bf16:
        warnings.warn("train.precision: bf16 on a CPU where peftlab finds no bf16 instructions (AVX512-BF16 or "
                      "AMX); it may be slower than fp32", stacklevel=2)
    return mixed_precision(requested, device, Backends.present(), cpu_bf16)

