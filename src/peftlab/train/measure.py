"""Cost measurements: peak memory, inference latency, size on disk."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PeakMemory:
    training: int  # bytes: what the comparisons use (see `kind`)
    kind: str  # cuda_max_allocated | rss_increase | peak_rss
    process: int | None  # the process's peak resident set on a CPU (imports and data included)


def memory_in_use() -> int:
    """Bytes in use now: CUDA allocated on a GPU, else the process's resident set."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return _proc_status("VmRSS") or 0


def reset_peak_memory() -> bool:
    """Start a new peak. On Linux, writing 5 to /proc/self/clear_refs resets the resident high-water mark;
    False where the peak cannot be reset (it then covers the whole process)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory(before: int) -> PeakMemory:
    """The peak since `reset_peak_memory`. On a GPU: CUDA max allocated. On a CPU: the resident peak above
    `before` (the process's memory before the model was loaded), so that the interpreter, the imports and the
    data, which dwarf a small model's training, are left out; the absolute peak is kept beside it."""
    if torch.cuda.is_available():
        return PeakMemory(torch.cuda.max_memory_allocated(), "cuda_max_allocated", None)
    high = _proc_status("VmHWM")
    if high is not None:
        return PeakMemory(max(0, high - before), "rss_increase", high)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # cannot be reset: the process's whole life
    rss = rss if sys.platform == "darwin" else rss * 1024
    return PeakMemory(rss, "peak_rss", rss)


def _proc_status(field: str) -> int | None:
    """A memory field of /proc/self/status in bytes (Linux); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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
