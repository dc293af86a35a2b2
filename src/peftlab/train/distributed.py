"""One run over several processes (`accelerate launch -m peftlab run ...`, or torchrun): data parallel.

Every process builds the same model (same seed) and draws the same global batches; each trains on its share of
every batch (rows `index::count`), and the gradients are summed across processes before the optimizer step, as
DDP does. The loss of a micro-batch is divided by the token (or example) count of the whole global micro-batch,
so the summed gradient is the one a single process computes on that batch: the run learns what one process
would with the same global batch (up to the order of floating-point sums). peftlab reduces the gradients itself
rather than through a DDP wrapper because its forward passes (the LM head at supervised positions, the prefix
cache, SparseLoRA's routing) call into the model below the wrapper. Evaluation is sharded by batch and its sums
gathered. Only the main process writes the run's outputs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def process_index() -> int:
    """This process's rank among the run's processes, known before the process group starts (0: the main one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def process_count() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return process_index() == 0


def active() -> bool:
    """Gradients and metrics are reduced across processes (a process group with more than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """This process's rows of a global batch, and whether it has any. A process left without rows (a last batch
    smaller than the number of processes) runs the first row with weight 0, so that every process runs the same
    forward and backward passes."""
    if not active():
        return batch, True
    rows = torch.arange(process_index(), batch["input_ids"].shape[0], process_count())
    if len(rows) == 0:
        return {k: v[:1] for k, v in batch.items()}, False
    return {k: v[rows] for k, v in batch.items()}, True


def sum_across(values: list[float]) -> list[float]:
    """Each value summed over the processes (the values themselves with one process)."""
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def collective_device() -> torch.device:
    """Where the tensors of a collective live: the CPU where the process group has gloo (a CPU run, or a GPU run
    with a gloo group beside NCCL), else this process's GPU (NCCL reduces GPU tensors only)."""
    if "gloo" in str(dist.get_backend()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def gather_lists(items: list[Any]) -> list[Any]:
    """The processes' lists joined in process order (the list itself with one process)."""
    if not active():
        return items
    gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `parameters` over the processes, in one flat buffer per dtype."""
    if not active():
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in parameters:
        if p.grad is None:  # unused in this step on every process (they run the same passes)
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset: offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()
