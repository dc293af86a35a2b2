"""SparseLoRA against dense LoRA: step time and quality, paired by seed.

For each seed, two `peftlab run` processes with the same model, data, plan, batches, steps and seed:
LoRA, then SparseLoRA (same adapters, frozen matmuls sparse for the chosen channels). It prints ms per
optimizer step (the dense warm-up steps included), the step-time ratio dense/sparse, the share of the
frozen projections' FLOPs that ran, and the quality delta: accuracy points for classification, the
relative change of the test loss for instruction tuning. Figures go to benchmarks/results/sparselora.jsonl.

    python benchmarks/sparselora.py                                      # minilm-l6 + reviews, 3 seeds
    python benchmarks/sparselora.py --model gemma-3-270m --task reviews-instruct --batch-size 8 --max-length 256
    python benchmarks/sparselora.py --model scaled-llama                  # tiny-llama's shape, scaled up
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from common import append_result, peftlab_run, run_arguments, task_spec

# A random LLaMA for machines without the gemma extra: tiny-llama's layout (GQA, gated FFN) at a size
# where the frozen matmuls dominate a step, as they do in real models.
SCALED_LLAMA = {"model_type": "llama", "num_hidden_layers": 8, "hidden_size": 512, "num_attention_heads": 8,
                "num_key_value_heads": 4, "intermediate_size": 1536, "max_position_embeddings": 1024,
                "vocab_size": 30522, "bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0], steps=150, batch_size=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ffn", type=float, default=None, help="method.ffn_sparsity (default: the method's)")
    parser.add_argument("--attention", type=float, default=None, help="method.attention_sparsity")
    parser.add_argument("--profile", default=None, help="method.profile: published, deeper or uniform")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-examples", type=int, default=500, help="task.max_eval_examples")
    args = parser.parse_args()
    sparse = {"name": "sparselora", **{k: v for k, v in (("ffn_sparsity", args.ffn), ("attention_sparsity", args.attention),
                                                          ("profile", args.profile)) if v is not None}}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model
        if model == "scaled-llama":
            model = str(work / "scaled-llama.json")
            Path(model).write_text(json.dumps(SCALED_LLAMA))
        for seed in range(args.seeds):
            row = {"seed": seed}
            for label, method in (("lora", "lora"), ("sparselora", sparse)):
                config = {
                    "model": model,
                    "task": {**task_spec(args), "max_length": args.max_length, "max_eval_examples": args.eval_examples},
                    "plan": {"placement": args.placement, "allocation": args.rank},
                    "method": method,
                    "train": {"max_steps": args.steps, "batch_size": args.batch_size, "seed": seed, "lr": args.lr,
                              "latency_batches": 0},
                }
                result = peftlab_run(config, work, f"{label}-{seed}")
                cost, test = result["cost"], result["metrics"]["test"]
                row[label] = {"step_ms": 1000 * cost["step_seconds"] / cost["steps"], "test": test,
                              "flops": (result["method"] or {}).get("flops", {}).get("executed_share")}
            rows.append(row)
            _print_row(row)

    speedups = [r["lora"]["step_ms"] / r["sparselora"]["step_ms"] for r in rows]
    accuracy = "accuracy" in rows[0]["lora"]["test"]
    if accuracy:
        deltas = [100 * (r["sparselora"]["test"]["accuracy"] - r["lora"]["test"]["accuracy"]) for r in rows]
        unit = "accuracy points"
    else:
        deltas = [100 * (r["sparselora"]["test"]["loss"] / r["lora"]["test"]["loss"] - 1) for r in rows]
        unit = "% test loss"
    summary = {"speedup_median": statistics.median(speedups), "speedups": speedups, "quality_delta_mean": statistics.mean(deltas),
               "quality_deltas": deltas, "quality_unit": unit,
               "executed_share_mean": statistics.mean(r["sparselora"]["flops"] for r in rows)}
    print(f"\n{args.model} + {args.data or args.task}: {args.placement} r={args.rank}, {args.steps} steps of "
          f"{args.batch_size} x <= {args.max_length}, sparselora {sparse}")
    print(f"step-time ratio dense/sparse: median {summary['speedup_median']:.2f}x "
          f"({', '.join(f'{s:.2f}' for s in speedups)})")
    print(f"quality delta (sparse - dense): mean {summary['quality_delta_mean']:+.2f} {unit} "
          f"({', '.join(f'{d:+.2f}' for d in deltas)})")
    print(f"frozen-projection FLOPs executed: {100 * summary['executed_share_mean']:.1f}% of dense (estimator included)")
    append_result("sparselora", {"model": args.model, "task": args.data or args.task, "placement": args.placement,
                                 "rank": args.rank, "steps": args.steps, "batch_size": args.batch_size,
                                 "max_length": args.max_length, "method": sparse, "runs": rows, **summary})


def _print_row(row: dict) -> None:
    lora, sparse = row["lora"], row["sparselora"]
    metric = "accuracy" if "accuracy" in lora["test"] else "loss"
    print(f"seed {row['seed']}: lora {lora['step_ms']:.0f} ms/step {metric} {lora['test'][metric]:.4f} | sparselora "
          f"{sparse['step_ms']:.0f} ms/step {metric} {sparse['test'][metric]:.4f}, FLOPs {100 * sparse['flops']:.0f}% "
          f"| {lora['step_ms'] / sparse['step_ms']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
