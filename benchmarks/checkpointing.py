"""Gradient checkpointing: the memory it saves against the time it adds, same model, data, plan and steps.

Both configurations run as their own `peftlab run` process (on a CPU the peak is the training's resident
increase, on a GPU the peak allocated memory); the script prints the training peak and time per step of each,
with the ratios, checks that the two runs learned the same (final training loss), and appends the figures to
benchmarks/results/checkpointing.jsonl with the machine they came from.

    python benchmarks/checkpointing.py --model gemma-3-270m --task reviews-instruct --batch-size 8 --max-length 256
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from common import MiB, append_result, peftlab_run, run_arguments, task_spec


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0], steps=4, batch_size=8)
    parser.add_argument("--precision", default="native", help="train.precision of both runs")
    args = parser.parse_args()
    base = {
        "model": {"name": args.model},
        "task": {**task_spec(args), "max_length": args.max_length, "max_eval_examples": 16},
        "plan": {"placement": args.placement, "allocation": args.rank},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "latency_batches": 0,
                  "precision": args.precision, "batching": "random"},
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, checkpointing in (("plain", False), ("checkpointed", True)):
            start = time.perf_counter()
            config = {**base, "train": {**base["train"], "gradient_checkpointing": checkpointing}}
            results[name] = peftlab_run(config, Path(tmp), name)
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    plain, checkpointed = results["plain"], results["checkpointed"]
    rows = []
    print(f"\n{args.model}: {args.steps} steps, batch {args.batch_size} x <= {args.max_length}, {args.placement} "
          f"r={args.rank}, precision {args.precision}, device {plain['environment']['device']}")
    print(f"{'config':<13} {'peak MiB':>9} {'ms/step':>9} {'final loss':>11}")
    for name, result in results.items():
        cost = result["cost"]
        row = {"config": name, "peak_memory_bytes": cost["peak_memory_bytes"], "peak_memory_kind": cost["peak_memory_kind"],
               "step_ms": 1000 * cost["train_seconds"] / cost["steps"], "final_train_loss": result["final_train_loss"]}
        rows.append(row)
        print(f"{name:<13} {row['peak_memory_bytes'] / MiB:>9,.0f} {row['step_ms']:>9,.0f} {row['final_train_loss']:>11.5f}")
    memory = checkpointed["cost"]["peak_memory_bytes"] / plain["cost"]["peak_memory_bytes"]
    time_ratio = rows[1]["step_ms"] / rows[0]["step_ms"]
    print(f"checkpointing: peak memory x{memory:.2f} ({1 - memory:.0%} saved), time per step x{time_ratio:.2f}; "
          f"final loss {'equal' if abs(rows[0]['final_train_loss'] - rows[1]['final_train_loss']) < 1e-3 else 'DIFFERS'}")
    append_result("checkpointing", {
        "model": args.model, "task": args.data or args.task, "steps": args.steps, "batch_size": args.batch_size,
        "max_length": args.max_length, "placement": args.placement, "rank": args.rank, "precision": args.precision,
        "memory_ratio": memory, "step_time_ratio": time_ratio, "rows": rows, "device": plain["environment"]["device"],
    })


if __name__ == "__main__":
    main()
