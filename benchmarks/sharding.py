"""Sharded layers (`train.sharding: fsdp`) against data parallel: one run over the same processes, model, data and
steps, each way.

Both runs go through torchrun (`peftlab run` in N processes); the script prints, from their result records, the
main process's peak memory (on a CPU its peak RSS, on a GPU the peak allocated memory), the parameters it held,
tokens/s, and the final training loss (the two learn the same weights: it must agree), each with its ratio to
data parallel. Full fine-tuning is where sharding pays: every layer's weights, gradients and AdamW moments
(16 bytes per fp32 parameter) are split, where LoRA splits only the frozen weights and its small adapters.

On a CPU both runs take glibc's fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=1 MiB): with its default, dynamic
threshold, the layer-sized buffers that sharding gathers and frees at every layer end up in the heap after the
first few frees, and the heap keeps them, so the resident set grows by about the model's size again (measured:
a 2.5 GiB peak where 1.8 GiB are in use). A GPU's figure is its allocator's, unaffected.
Figures are appended to benchmarks/results/sharding.jsonl with the machine they came from.

    python benchmarks/sharding.py                                    # gemma-3-270m's shape, random weights, CPU
    python benchmarks/sharding.py --random-from llama-3.2-1b --processes 4 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import MiB, append_result, peftlab_run, random_model

MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}  # see the docstring


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-from", default="gemma-3-270m", help="catalog architecture built with random weights")
    parser.add_argument("--method", default="full", choices=["full", "lora"])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="the global batch, shared out over the processes")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return parser.parse_args()


def main() -> None:
    args = arguments()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = str(random_model(args.random_from, workdir / "model", None))
        base = {
            "model": {"name": model},
            "task": {"name": "reviews-instruct", "max_length": args.max_length, "max_eval_examples": 16},
            "method": {"name": args.method},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "latency_batches": 0,
                      "device": args.device, "evaluate_test": False, "lr": 1e-4},
        }
        results = {}
        for sharding in ("none", "fsdp"):
            start = time.perf_counter()
            config = {**base, "train": {**base["train"], "sharding": sharding}}
            results[sharding] = peftlab_run(config, workdir, sharding, env=MALLOC, processes=args.processes)
            print(f"sharding {sharding}: {time.perf_counter() - start:.0f} s", file=sys.stderr)

    reference = results["none"]["cost"]
    print(f"\n{args.random_from} (random weights), {args.method}: {args.steps} steps, global batch {args.batch_size} x "
          f"{args.max_length}, {args.processes} processes, device {results['fsdp']['environment']['device']}")
    print(f"{'sharding':<9} {'peak MiB':>9} {'x none':>7} {'params held':>12} {'x none':>7} {'tokens/s':>9} {'x none':>7} "
          f"{'final loss':>11}")
    rows = []
    for sharding, result in results.items():
        cost, held = result["cost"], result["environment"]["sharding"]
        row = {"sharding": sharding, "peak_memory_bytes": cost["peak_memory_bytes"],
               "peak_memory_kind": cost["peak_memory_kind"], "peak_memory_process_bytes": cost["peak_memory_process_bytes"],
               "params_per_process": held["params_per_process"] if held else cost["total_params"],
               "tokens_per_second": cost["tokens_per_second"], "final_train_loss": result["final_train_loss"],
               "sharding_report": held}
        rows.append(row)
        print(f"{sharding:<9} {row['peak_memory_bytes'] / MiB:>9,.0f} "
              f"{row['peak_memory_bytes'] / reference['peak_memory_bytes']:>7.2f} {row['params_per_process']:>12,} "
              f"{row['params_per_process'] / reference['total_params']:>7.2f} {row['tokens_per_second']:>9,.0f} "
              f"{row['tokens_per_second'] / reference['tokens_per_second']:>7.2f} {row['final_train_loss']:>11.6f}")
    append_result("sharding", {
        "model": args.random_from, "random_weights": True, "method": args.method, "processes": args.processes,
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
        "total_params": reference["total_params"], "rows": rows, "device": results["fsdp"]["environment"]["device"],
        "environment": MALLOC,
    })


if __name__ == "__main__":
    main()
