"""Cost measurements: peak memory, inference latency, size on disk."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def peak_memory() -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024, "peak_rss"


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.no_grad()
def latency_ms(forward: Callable[[dict], object], batches: Sequence[dict]) -> float:
    """Mean milliseconds per batch, after a warm-up forward of the first batch: the first call pays
    one-time costs (allocations, kernel selection on a GPU) that are not the steady-state latency."""
    if not batches:
        return float("nan")
    forward(batches[0])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        forward(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / len(batches)
