"""Attention kernels on this machine: one attention call's forward and backward through torch's fused kernel (what
transformers' `sdpa` runs) and its math kernel, in fp32 and bf16, then a bundled model's training step (forward and
backward, all weights frozen but one norm so gradients flow through every layer) with transformers' `sdpa` and
`eager` under the run's autocast. Ratios against `sdpa` in the same process; this is the measurement behind
`model.attn_implementation: auto` choosing eager on a CPU under bf16 autocast.

    python benchmarks/attention.py                # MiniLM (demo shape) and, with the gemma extra, Gemma 3 270M
    python benchmarks/attention.py --repeats 3 --quick
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import append_result
from torch.nn.attention import SDPBackend, sdpa_kernel

# (name, batch, heads, length, head dim): MiniLM at the demo's batch and length; Gemma 3 270M at the instruction
# studies' (4 query heads of 256, grouped key/values expanded here)
SHAPES = (("minilm", 8, 12, 48, 32), ("gemma-3-270m", 8, 4, 128, 256))


def best_ms(step: Callable[[], None], repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one warm-up (this machine is shared: the minimum is the figure
    least disturbed by others)."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def kernel_ms(batch: int, heads: int, length: int, dim: int, dtype: torch.dtype, backend: SDPBackend, repeats: int) -> float:
    x = torch.randn(batch, length, heads * dim, dtype=dtype, requires_grad=True)

    def step() -> None:
        with sdpa_kernel(backend):
            q, k, v = (x.view(batch, length, heads, dim).transpose(1, 2) * 1.0 for _ in range(3))
            F.scaled_dot_product_attention(q, k, v, scale=dim ** -0.5).float().sum().backward()

    return best_ms(step, repeats)


def model_step_ms(name: str, kernel: str, repeats: int, batch: int, length: int) -> float:
    from peftlab.models.load import load_model
    from peftlab.specs import ModelSpec

    model = load_model(ModelSpec(name=name), attn_implementation=kernel)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    norm = next(m for m in model.modules() if "norm" in type(m).__name__.lower() and hasattr(m, "weight"))
    norm.weight.requires_grad_(True)  # the lowest norm: gradients flow back through every layer
    ids = torch.randint(100, 1000, (batch, length))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        out.logits.float().sum().backward()

    return best_ms(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="kernels and MiniLM only")
    args = parser.parse_args()
    record: dict = {"kernels": {}, "models": {}}
    for name, batch, heads, length, dim in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            fused = kernel_ms(batch, heads, length, dim, dtype, SDPBackend.FLASH_ATTENTION, args.repeats)
            math = kernel_ms(batch, heads, length, dim, dtype, SDPBackend.MATH, args.repeats)
            key = f"{name} {str(dtype).removeprefix('torch.')}"
            record["kernels"][key] = {"fused_ms": fused, "math_ms": math}
            print(f"attention forward+backward, {key} (batch {batch}, {heads} heads, {length} tokens): "
                  f"fused {fused:.2f} ms, math {math:.2f} ms ({fused / math:.2f}x)")
    models = [("minilm-l6", 8, 48)] + ([] if args.quick else [("gemma-3-270m", 8, 128)])
    for name, batch, length in models:
        try:
            sdpa = model_step_ms(name, "sdpa", args.repeats, batch, length)
            eager = model_step_ms(name, "eager", args.repeats, batch, length)
        except Exception as exc:  # the gemma extra may be missing
            print(f"{name}: skipped ({str(exc).splitlines()[0]})")
            continue
        record["models"][name] = {"sdpa_ms": sdpa, "eager_ms": eager, "speedup": sdpa / eager}
        print(f"{name} training step under bf16 autocast (batch {batch} x {length}): sdpa {sdpa:.0f} ms, "
              f"eager {eager:.0f} ms (eager {sdpa / eager:.2f}x as fast)")
    append_result("attention", record)


if __name__ == "__main__":
    main()
