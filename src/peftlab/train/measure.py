"""Cost measurements: inference latency and size on disk (memory is read by `train.device`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from peftlab.train.device import synchronize


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.no_grad()
def latency_ms(forward: Callable[[dict], object], batches: Sequence[dict], device: torch.device | str = "cpu") -> float:
    """Mean milliseconds per batch, after a warm-up forward of the first batch: the first call pays
    one-time costs (allocations, kernel selection on a GPU) that are not the steady-state latency."""
    if not batches:
        return float("nan")
    forward(batches[0])
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        forward(batch)
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / len(batches)
