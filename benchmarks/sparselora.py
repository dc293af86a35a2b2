"""SparseLoRA against dense LoRA: step time and quality, paired by seed.

For each seed, `peftlab run` processes with the same model, data, plan, batches, steps and seed: LoRA, then
SparseLoRA (same adapters, frozen matmuls sparse for the chosen channels), at fixed sparsities or, with
`--budgets`, calibrated with `sparsity: auto(loss_budget=B)` for each budget B (the speed / quality curve; the
profile is measured once, then read from the cache). It prints ms per optimizer step (the dense warm-up steps
included), the step-time ratio dense/sparse, the share of the sparsified projections' FLOPs that ran (and of
every layer's attention and FFN projections, those left dense included), and the quality delta: accuracy
points for classification, the relative change of the test loss for instruction tuning, with 95% t intervals
over the paired seeds. Figures go to benchmarks/results/sparselora.jsonl.

    python benchmarks/sparselora.py                                      # minilm-l6 + reviews, 3 seeds
    python benchmarks/sparselora.py --budgets 0.005,0.01,0.02,0.05       # the calibrated curve
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
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--ffn", type=float, default=None, help="method.ffn_sparsity (default: the method's)")
    parser.add_argument("--attention", type=float, default=None, help="method.attention_sparsity")
    parser.add_argument("--profile", default=None, help="method.profile: published, deeper or uniform")
    parser.add_argument("--budgets", default=None, help="comma-separated loss budgets: sparsity auto(loss_budget=B) each")
    parser.add_argument("--profile-batches", type=int, default=4, help="training batches the calibration measures")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-examples", type=int, default=500, help="task.max_eval_examples")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    if args.budgets:
        variants = {f"auto({float(b):g})": {"name": "sparselora", "sparsity": {"loss_budget": float(b),
                                                                               "batches": args.profile_batches}}
                    for b in args.budgets.split(",")}
    else:
        variants = {"sparselora": {"name": "sparselora", **{k: v for k, v in (
            ("ffn_sparsity", args.ffn), ("attention_sparsity", args.attention), ("profile", args.profile)) if v is not None}}}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = args.model
        if model == "scaled-llama":
            model = str(work / "scaled-llama.json")
            Path(model).write_text(json.dumps(SCALED_LLAMA))
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            row = {"seed": seed}
            for label, method in (("lora", "lora"), *variants.items()):
                config = {
                    "model": model,
                    "task": {**task_spec(args), "max_length": args.max_length, "max_eval_examples": args.eval_examples},
                    "plan": {"placement": args.placement, "allocation": args.rank},
                    "method": method,
                    "train": {"max_steps": args.steps, "batch_size": args.batch_size, "seed": seed, "lr": args.lr,
                              "latency_batches": 0},
                }
                result = peftlab_run(config, work, f"{label}-{seed}")
                cost, test, report = result["cost"], result["metrics"]["test"], result["method"] or {}
                flops = report.get("flops", {})
                row[label] = {"step_ms": 1000 * cost["train_seconds"] / cost["steps"], "test": test,
                              "flops": flops.get("executed_share"), "flops_all": flops.get("all_projections_share"),
                              "calibration": _calibration(report.get("calibration"))}
                if label != "lora":
                    _print_row(row, label)
            rows.append(row)

    accuracy = "accuracy" in rows[0]["lora"]["test"]
    unit = "accuracy points" if accuracy else "% test loss"
    curve = {}
    for label in variants:
        speedups = [r["lora"]["step_ms"] / r[label]["step_ms"] for r in rows]
        if accuracy:
            deltas = [100 * (r[label]["test"]["accuracy"] - r["lora"]["test"]["accuracy"]) for r in rows]
        else:
            deltas = [100 * (r[label]["test"]["loss"] / r["lora"]["test"]["loss"] - 1) for r in rows]
        shares = [r[label]["flops"] for r in rows if r[label]["flops"] is not None]
        every = [r[label]["flops_all"] for r in rows if r[label]["flops_all"] is not None]
        curve[label] = {"speedup_mean": statistics.mean(speedups), "speedup_ci95": _interval(speedups),
                        "speedups": speedups, "quality_delta_mean": statistics.mean(deltas),
                        "quality_delta_ci95": _interval(deltas), "quality_deltas": deltas,
                        "executed_share_mean": statistics.mean(shares) if shares else 1.0,
                        "all_projections_share_mean": statistics.mean(every) if every else 1.0,
                        "calibration": rows[0][label]["calibration"]}
    print(f"\n{args.model} + {args.data or args.task}: {args.placement} r={args.rank}, {args.steps} steps of "
          f"{args.batch_size} x <= {args.max_length}, {args.seeds} paired seeds; quality in {unit} (sparse - dense)")
    print(f"{'variant':>14} {'step-time ratio (95% CI)':>26} {'quality delta (95% CI)':>26} {'FLOPs run':>10}"
          f" {'(all)':>6}  allocation")
    for label, c in curve.items():
        allocation = c["calibration"]["summary"] if c["calibration"] else ""
        print(f"{label:>14} {c['speedup_mean']:>9.2f}x [{c['speedup_ci95'][0]:.2f}, {c['speedup_ci95'][1]:.2f}]"
              f" {c['quality_delta_mean']:>+10.2f} [{c['quality_delta_ci95'][0]:+.2f}, {c['quality_delta_ci95'][1]:+.2f}]"
              f" {100 * c['executed_share_mean']:>9.0f}% {100 * c['all_projections_share_mean']:>5.0f}%  {allocation}")
    append_result("sparselora", {"model": args.model, "task": args.data or args.task, "placement": args.placement,
                                 "rank": args.rank, "steps": args.steps, "batch_size": args.batch_size,
                                 "max_length": args.max_length, "variants": variants, "runs": rows,
                                 "quality_unit": unit, "curve": curve})


def _calibration(report: dict | None) -> dict | None:
    """The calibrated allocation in brief: sparse blocks, predicted and measured loss increase."""
    if not report:
        return None
    sparse = sum(level > 0 for level in report["levels"].values())
    summary = ("dense (LoRA)" if report["dense"] else
               f"{sparse}/{len(report['levels'])} blocks sparse, +{report['predicted_increase']:.2%} predicted, "
               f"{report['measured_increase']:+.2%} measured"
               + (f", {report['held_out_increase']:+.2%} held out" if report.get("held_out_increase") is not None else ""))
    return {**report, "summary": summary}


def _interval(values: list[float]) -> tuple[float, float]:
    """95% t interval of the mean (the values themselves with one)."""
    from scipy import stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean - half, mean + half


def _print_row(row: dict, label: str) -> None:
    lora, sparse = row["lora"], row[label]
    metric = "accuracy" if "accuracy" in lora["test"] else "loss"
    flops = (f"FLOPs {100 * sparse['flops']:.0f}% ({100 * (sparse['flops_all'] or 1.0):.0f}% of all)"
             if sparse["flops"] is not None else "dense")
    print(f"seed {row['seed']}: lora {lora['step_ms']:.0f} ms/step {metric} {lora['test'][metric]:.4f} | {label} "
          f"{sparse['step_ms']:.0f} ms/step {metric} {sparse['test'][metric]:.4f}, {flops} "
          f"| {lora['step_ms'] / sparse['step_ms']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
