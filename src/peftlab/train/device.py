"""Where a run computes and how its memory is read: CUDA, then Apple's MPS, then the CPU (`train.device`
overrides), the autocast each supports, and the methods that cannot run there.

The choice takes the available backends as an argument, so that its logic is tested on any machine."""

from __future__ import annotations

import importlib.util
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.errors import PeftlabError

DEVICES = ("auto", "cuda", "mps", "cpu")

@dataclass(frozen=True)
class Backends:
    cuda: bool
    mps: bool
    cuda_bf16: bool = False  # the GPU has bf16 (Ampere and later)

    @classmethod
    def present(cls) -> Backends:
        cuda = torch.cuda.is_available()
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        return cls(cuda, mps, cuda and torch.cuda.is_bf16_supported())


def choose_device(requested: str = "auto", backends: Backends | None = None) -> str:
    """`auto`: cuda, then mps, then cpu; a named device must be available."""
    backends = backends or Backends.present()
    if requested == "auto":
        return "cuda" if backends.cuda else "mps" if backends.mps else "cpu"
    if requested not in DEVICES:
        raise PeftlabError(f"train.device: {requested!r} is not a device; valid: {', '.join(DEVICES)}")
    if requested != "cpu" and not getattr(backends, requested):
        found = [d for d in ("cuda", "mps") if getattr(backends, d)] + ["cpu"]
        raise PeftlabError(f"train.device: {requested} is not available on this machine (torch finds "
                           f"{', '.join(found)}); use auto or one of those")
    return requested


def mixed_precision(requested: str, device: str, backends: Backends, cpu_bf16: bool) -> str:
    """accelerate's mixed precision for `train.precision` on `device`.

    auto: bf16 autocast on a GPU that has it (else fp16), fp16 on MPS, fp32 on a CPU. native: as auto, and bf16
    on a CPU that has bf16 instructions. Weights, gradients and optimizer state stay fp32 under autocast."""
    if requested == "fp32":
        return "no"
    if device == "cuda":
        if requested in ("auto", "native"):
            return "bf16" if backends.cuda_bf16 else "fp16"
        return requested
    if device == "mps":
        return "fp16" if requested in ("auto", "native") else requested
    if requested == "fp16":
        raise PeftlabError("train.precision: fp16 autocast needs a GPU; on a CPU use bf16, fp32 or auto")
    if requested == "native":
        return "bf16" if cpu_bf16 else "no"
    return "bf16" if requested == "bf16" else "no"


def attention_implementation(requested: str, device: str, mixed: str) -> str | None:
    """transformers' `attn_implementation` for `model.attn_implementation` on `device` at accelerate's `mixed`
    precision; None leaves transformers' default (sdpa where the model has it, else eager).

    auto trains with eager attention on a CPU under bf16 autocast: torch's CPU flash-attention kernel (what sdpa
    runs there) can take several times longer for its bf16 backward pass than for its fp32 one
    (`benchmarks/attention.py`); the run's forward-only phases switch back to sdpa (`RunContext.forward_only`)."""
    check_attention(requested, device)
    if requested == "auto":
        return "eager" if device == "cpu" and mixed == "bf16" else None
    return requested


def check_attention(requested: str, device: str) -> None:
    """Refuses a kernel this machine cannot run (flash_attention_2 needs CUDA and the flash-attn package)."""
    if requested != "flash_attention_2":
        return
    if device != "cuda":
        raise PeftlabError(f"model.attn_implementation: flash_attention_2 needs a CUDA GPU (this run is on {device}); "
                           "use auto, sdpa or eager")
    if importlib.util.find_spec("flash_attn") is None:
        raise PeftlabError("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                           "(pip install flash-attn); use auto, sdpa or eager")


def cpu_has_bf16() -> bool:
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (timings)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


@dataclass(frozen=True)
class PeakMemory:
    training: int  # bytes: what the comparisons use (see `kind`)
    kind: str  # cuda_max_allocated | mps_driver_allocated | rss_increase | peak_rss
    process: int | None  # the process's peak resident set on a CPU (imports and data included)


def memory_in_use(device: str = "cpu") -> int:
    """Bytes in use now: CUDA allocated on a GPU, MPS driver-allocated on Apple silicon, else the resident set."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    if device == "mps":
        return torch.mps.driver_allocated_memory()
    return _proc_status("VmRSS") or 0


def reset_peak_memory(device: str = "cpu") -> bool:
    """Start a new peak. On Linux, writing 5 to /proc/self/clear_refs resets the resident high-water mark;
    False where the peak cannot be reset (MPS keeps no peak; a CPU elsewhere: it covers the whole process)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    if device == "mps":
        return False
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory(before: int, device: str = "cpu") -> PeakMemory:
    """The peak since `reset_peak_memory`. CUDA: max allocated. MPS: what the driver holds after training (its
    caching allocator keeps what the peak needed), above `before`. A CPU: the resident peak above `before` (the
    process's memory before the model was loaded), so that the interpreter, the imports and the data, which dwarf
    a small model's training, are left out; the absolute peak is kept beside it."""
    if device == "cuda":
        return PeakMemory(torch.cuda.max_memory_allocated(), "cuda_max_allocated", None)
    if device == "mps":
        return PeakMemory(max(0, torch.mps.driver_allocated_memory() - before), "mps_driver_allocated", None)
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
