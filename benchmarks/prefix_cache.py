"""The frozen-prefix activation cache: upper-half placement with the cache against all-layer placement.

Four `peftlab run` processes on the same model, data, rank, batches and steps:
- all:          LoRA on every layer (nothing to cache: the baseline);
- upper:        LoRA on the upper half, cache off (what skipping the backward through frozen layers saves);
- upper-cold:   LoRA on the upper half, cache on, built by this run (a study's first run on these data);
- upper-warm:   the same again, cache loaded from disk (later epochs and the study's other runs).

Every row runs the model with its dropout at 0 (`model.dropout: 0`): the cache is used only where no
dropout runs below the adapters, so that it never changes what is learned, and the rows compare like with
like. It prints time per optimizer step with ratios to `all`, the cache's build time, and one epoch of the
training split estimated from them (first epoch = build + steps; later epochs = steps). Figures are
appended to benchmarks/results/prefix_cache.jsonl.

    python benchmarks/prefix_cache.py                    # minilm-l6 + reviews, 60 steps of 16 x <= 128
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from common import append_result, peftlab_run, run_arguments, task_spec

UPPER = {"roles": "all", "layers": "upper-half"}
CONFIGS = {  # name: (placement, cache on, cache directory)
    "all": ("all", False, "cold"),
    "upper": (UPPER, False, "cold"),
    "upper-cold": (UPPER, True, "cold"),
    "upper-warm": (UPPER, True, "cold"),  # the directory upper-cold filled
}


def main() -> None:
    args = run_arguments(__doc__.splitlines()[0], steps=60, batch_size=16, placement=None).parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, (placement, cache, directory) in CONFIGS.items():
            config = {
                "model": {"name": args.model, "dropout": 0.0},
                "task": {**task_spec(args), "max_length": args.max_length, "max_eval_examples": 8},
                "plan": {"placement": placement, "allocation": args.rank},
                "train": {"max_steps": args.steps, "batch_size": args.batch_size, "latency_batches": 0,
                          "prefix_cache": cache},
            }
            result = peftlab_run(config, work, name, env={"PEFTLAB_CACHE": str(work / directory)})
            cost = result["cost"]
            rows[name] = {"step_ms": 1000 * cost["train_seconds"] / cost["steps"],
                          "cache_seconds": (result["speed"].get("prefix_cache") or {}).get("build_seconds", 0.0),
                          "cache": result["speed"].get("prefix_cache"),
                          "train_examples": result["data"]["train"], "padding_fraction": cost["padding_fraction"]}

    per_epoch = math.ceil(rows["all"]["train_examples"] / args.batch_size)
    base = rows["all"]["step_ms"]
    print(f"\n{args.model} + {args.data or args.task}: LoRA r={args.rank}, {args.steps} steps of {args.batch_size} x <= "
          f"{args.max_length} tokens; one epoch = {per_epoch} steps")
    print(f"{'config':<11} {'ms/step':>8} {'speed-up':>9} {'cache s':>8} {'1st epoch s':>12} {'later epochs s':>15}")
    for name, row in rows.items():
        build = row["cache_seconds"] if name == "upper-cold" else 0.0
        row["first_epoch_s"] = build + per_epoch * row["step_ms"] / 1000
        row["later_epoch_s"] = per_epoch * row["step_ms"] / 1000
        print(f"{name:<11} {row['step_ms']:>8,.0f} {base / row['step_ms']:>8.2f}x {row['cache_seconds']:>8.1f} "
              f"{row['first_epoch_s']:>12,.0f} {row['later_epoch_s']:>15,.0f}")
    speedup = base / rows["upper-warm"]["step_ms"]
    print(f"epochs after the first, upper half with the cache against all layers without it: {speedup:.2f}x faster")
    append_result("prefix_cache", {"model": args.model, "task": args.data or args.task, "rank": args.rank, "steps": args.steps,
                                   "batch_size": args.batch_size, "max_length": args.max_length,
                                   "steps_per_epoch": per_epoch, "rows": rows, "later_epochs_speedup": speedup})


if __name__ == "__main__":
    main()
