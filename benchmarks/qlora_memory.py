"""QLoRA's memory against LoRA with fp32 and with bf16 base weights: same model, data, plan and steps.

Each configuration runs as its own `peftlab run` process (on a CPU the peak is the process's peak RSS,
on a GPU the peak allocated memory), and the script prints, from their result records:
- base weights: bytes held by the frozen weights, and for QLoRA the 4-bit layers against the same
  layers in 16 bits (the target is <= 30%: 4 bits plus block scales);
- training peak memory and tokens/s, each with its ratio to bf16 LoRA.
Figures are appended to benchmarks/results/qlora_memory.jsonl with the machine they came from.

    python benchmarks/qlora_memory.py                        # minilm-l6 + reviews, 20 steps
    python benchmarks/qlora_memory.py --model gemma-3-270m --task reviews-instruct --batch-size 8
    python benchmarks/qlora_memory.py --random-from qwen2.5-0.5b --data alpaca.json --kind instruction

`--random-from NAME` builds a LLaMA-style model with the dimensions of a catalog architecture and random
weights (memory and speed do not depend on the values), for machines without the real weights.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from common import MiB, append_result, peftlab_run, random_model, run_arguments, task_spec

CONFIGS = {
    "lora-fp32": {"model": {"dtype": "fp32"}, "method": {"name": "lora"}},
    "lora-bf16": {"model": {"dtype": "bf16"}, "method": {"name": "lora"}},
    # the QLoRA paper keeps what is not quantized (embeddings, norms) in 16 bits
    "qlora-nf4": {"model": {"dtype": "bf16"}, "method": {"name": "qlora"}},
}


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0], steps=20, batch_size=8)
    parser.add_argument("--random-from", help="catalog architecture to build with random weights")
    parser.add_argument("--tokenizer", help="with --random-from: a directory with a 30,522-token tokenizer")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = str(random_model(args.random_from, workdir / "model", args.tokenizer)) if args.random_from else args.model
        task = task_spec(args)
        base = {
            "model": {"name": model},
            "task": {**task, "max_length": args.max_length, "max_eval_examples": 64},
            "plan": {"placement": args.placement, "allocation": args.rank},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "latency_batches": 0},
        }
        results = {}
        for name in CONFIGS:
            start = time.perf_counter()
            config = {**base, "model": {**base["model"], **CONFIGS[name]["model"]}, "method": CONFIGS[name]["method"]}
            results[name] = peftlab_run(config, workdir, name)
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)

    reference = results["lora-bf16"]["cost"]
    q = results["qlora-nf4"]["cost"]
    four_bit_vs_16 = q["quantized_weight_bytes"] / (2 * q["quantized_params"])
    print(f"\n{args.random_from or args.model}: {args.steps} steps, batch {args.batch_size} x {args.max_length}, "
          f"{args.placement} r={args.rank}, device {results['qlora-nf4']['environment']['device']}")
    print(f"{'config':<11} {'base weights MiB':>17} {'x bf16':>7} {'peak MiB':>9} {'x bf16':>7} {'tokens/s':>9} {'x bf16':>7}")
    rows = []
    for name, result in results.items():
        cost = result["cost"]
        row = {
            "config": name,
            "base_weight_bytes": cost["frozen_weight_bytes"],
            "quantized_weight_bytes": cost["quantized_weight_bytes"],
            "quantized_params": cost["quantized_params"],
            "peak_memory_bytes": cost["peak_memory_bytes"],
            "peak_memory_kind": cost["peak_memory_kind"],
            "tokens_per_second": cost["tokens_per_second"],
            "adapter_params": cost["adapter_params"],
        }
        rows.append(row)
        print(f"{name:<11} {row['base_weight_bytes'] / MiB:>17,.1f} "
              f"{row['base_weight_bytes'] / reference['frozen_weight_bytes']:>7.2f} "
              f"{row['peak_memory_bytes'] / MiB:>9,.0f} {row['peak_memory_bytes'] / reference['peak_memory_bytes']:>7.2f} "
              f"{row['tokens_per_second']:>9,.0f} {row['tokens_per_second'] / reference['tokens_per_second']:>7.2f}")
    print(f"4-bit layers: {q['quantized_weight_bytes'] / MiB:,.1f} MiB for {q['quantized_params']:,} weights = "
          f"{four_bit_vs_16:.1%} of the same layers in bf16 (target <= 30%)")
    environment = results["qlora-nf4"]["environment"]
    append_result("qlora_memory", {
        "model": args.random_from or args.model,
        "random_weights": bool(args.random_from),
        "task": args.data or args.task,
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
        "placement": args.placement, "rank": args.rank,
        "four_bit_vs_bf16_layers": four_bit_vs_16,
        "rows": rows,
        "device": environment["device"],
    })


if __name__ == "__main__":
    main()
