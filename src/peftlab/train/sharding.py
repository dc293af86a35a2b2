"""Sharded training (`train.sharding: fsdp`): each layer block's parameters split over the run's processes.

Every layer block becomes one unit of torch's FSDP2 (`fully_shard`): a process holds 1/N of each block's weights,
gradients and optimizer state, gathers a block's full weights just before the block runs and frees them after,
in the forward and again in the backward pass, and reduce-scatters the block's gradients. The model's root, its
embeddings, final norm and head are not sharded: peftlab's forward passes call the backbone and the head
directly (the LM head at supervised positions only), below the root's forward, where FSDP's root unit would
gather them, and a tied head shares its weight with the embeddings. Those stay whole on every process, and
their gradients are summed as in data parallel (`distributed.sum_gradients`).

What sharding asks of the rest of a run:

- the gradients are summed, not averaged, over the processes, as data parallel sums them: each process's loss is
  divided by the global batch's count already (`train.loop`);
- every process runs the same number of forward passes (each one gathers weights from all processes): training
  does already; evaluation runs its batches in rounds (`train.evaluate`);
- the work of the main process alone (completions, benchmarks, latency, saving) runs with the layers gathered
  on every process (`gathered`), so that its forward passes need no other process;
- gradient clipping takes the global norm over shards and whole parameters (`clip_gradients`).

accelerate's FSDP plugin is not used: it shards the root as well, which peftlab's forward passes bypass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from peftlab.errors import PeftlabError
from peftlab.models.sites import layer_blocks
from peftlab.train import distributed


def check_shardable(method, device: str, compile_layers: bool) -> None:
    """Refuse, in one line, `train.sharding: fsdp` where it cannot run: a method that reads its weights outside
    the model's forward, a data-driven init, compiled layers, a device FSDP does not run on."""
    name = method.name
    if not type(method).shardable:
        raise PeftlabError(f"train.sharding fsdp: method {name} is not shardable (LoRA, DoRA, LoRA+ and full "
                           "fine-tuning are); use sharding none, or one of those")
    if getattr(method.spec, "init", "default") == "eva":
        raise PeftlabError("train.sharding fsdp: method.init eva decomposes every site's inputs on whole weights "
                           "before training; use another init, or sharding none")
    if compile_layers:
        raise PeftlabError("train.sharding fsdp: train.compile is not available with sharded layers; turn one off")
    if device == "mps":
        raise PeftlabError("train.sharding fsdp: not available on MPS; use train.device cuda or cpu")


@dataclass
class Sharding:
    """The sharded layer blocks of a run, and how many parameters each process holds."""

    units: list[nn.Module]  # FSDPModule layer blocks
    processes: int
    sharded_params: int  # in the layer blocks, split over the processes
    whole_params: int  # embeddings, norm, head: on every process
    local_params: int  # held by this process

    def report(self) -> dict[str, Any]:
        return {"kind": "fsdp", "processes": self.processes, "units": len(self.units),
                "sharded_params": self.sharded_params, "whole_params": self.whole_params,
                "params_per_process": self.local_params}


def shard(model: nn.Module, device: torch.device) -> Sharding | None:
    """Shard `model`'s layer blocks over the run's processes (in place); None with one process (nothing to
    split). Before the optimizer is built: it must see the sharded parameters."""
    if not distributed.active():
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    found = layer_blocks(model)
    if found is None:
        raise PeftlabError(f"train.sharding fsdp: peftlab cannot find the layer blocks of "
                           f"{type(model).__name__}; use sharding none")
    processes = distributed.process_count()
    mesh = init_device_mesh(device.type, (processes,))
    units = []
    for layer in found[0]:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        layer.set_gradient_divide_factor(1.0)  # a sum: each process's loss is over the global count already
        layer.set_force_sum_reduction_for_comms(True)  # a plain sum, which every backend has (gloo: no PREMUL_SUM)
        units.append(layer)
    params = list(model.parameters())
    sharded = sum(p.numel() for p in params if isinstance(p, DTensor))
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    whole = sum(p.numel() for p in params if not isinstance(p, DTensor))
    return Sharding(units, processes, sharded, whole, local)


@contextmanager
def gathered(sharding: Sharding | None) -> Iterator[None]:
    """Every layer block's full weights on every process, kept between forward passes, so that the main process
    alone can run the model (generation, latency) and read its parameters (saving); then sharded again once
    every process is here. Every process enters it. Nothing to do without sharding."""
    if sharding is None:
        yield
        return
    for unit in sharding.units:
        unit.unshard()
        unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        dist.barrier()  # the others wait here for the main process's work
        for unit in sharding.units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without its frozen parameters (an adapter's weights; the whole model for full
    fine-tuning), as full tensors on the CPU of the main process (empty elsewhere). Every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


@contextmanager
def state_dict_read_as(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """`model.state_dict()` returns `state` (the gathered one) while saving: PEFT's and transformers'
    `save_pretrained` read it, and a sharded model's own state dict holds shards."""
    model.state_dict = lambda *args, **kwargs: dict(state)
    try:
        yield
    finally:
        del model.state_dict


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def whole(parameters: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters not sharded (their gradients are summed by `distributed.sum_gradients`)."""
    return [p for p in parameters if not isinstance(p, DTensor)]


@torch.no_grad()
def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so that their global norm is at most `max_norm`; the norm before scaling. The
    squares of the shards are summed over the processes; whole parameters' gradients (the same on every
    process once summed) count once."""
    grads = [p.grad for p in parameters if p.grad is not None]
    local = [g.to_local() for g in grads if isinstance(g, DTensor)]
    squares = torch.stack([g.float().pow(2).sum() for g in local]).sum() if local else torch.zeros(())
    shards = distributed.sum_across([squares.item()])[0]
    replicated = sum(g.float().pow(2).sum().item() for g in grads if not isinstance(g, DTensor))
    norm = math.sqrt(shards + replicated)
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
    return norm
