"""Quality against the reference implementation: PEFT + transformers' Trainer vs `peftlab run`, paired by seed.

One configuration (default: MiniLM-L6, LoRA r=8 on attention, one epoch of 1,000 bundled reviews at 48 tokens,
batch 8, lr 1.5e-3, no dropout, fp32) trains on at least 6 seeds with
- trainer:          PEFT (LoRA on exactly the plan's modules, the head trained) + transformers' `Trainer`,
                    random batches from its seeded sampler, linear schedule with the same warmup, clipping 1.0;
- peftlab-bucketed: `peftlab run` with its defaults (length-bucketed batches, frozen-prefix cache, last layer
                    at the head);
- peftlab-random:   `peftlab run` with `train.batching: random`.
All three read peftlab's tokenized split (the same training rows, one epoch, the same 1,000 test reviews) and
start from the same weights (the head initialised from the seed). Accuracy on the test rows is computed here
for the Trainer side. Each pair of harnesses is compared over the seeds (paired t), with its TOST verdict
within ±0.01 accuracy (each on its own spread, Holm over the three equivalence tests), and the same for
the plain paired t-tests.

    python benchmarks/reference.py                  # 6 seeds (~15 min on 2 CPU cores)
    python benchmarks/reference.py --seeds 10 --lr 1e-3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import append_result, peft_model_and_data, peftlab_run

HARNESSES = ("trainer", "peftlab-bucketed", "peftlab-random")
MARGIN = 0.01


def run_config(args: argparse.Namespace, seed: int, batching: str = "bucketed") -> dict:
    return {
        "model": {"name": args.model, "dropout": 0.0},
        "task": {"name": "reviews", "max_length": args.max_length, "max_train_examples": args.train_examples,
                 "max_eval_examples": args.eval_examples},
        "plan": {"placement": args.placement, "allocation": args.rank},
        "method": {"name": "lora", "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": args.lr, "seed": seed, "batching": batching,
                  "precision": "fp32", "latency_batches": 0},
    }


def trainer_accuracy(config: dict, threads: int) -> float:
    """Train with PEFT + Trainer in this process; accuracy on peftlab's test rows."""
    import torch
    from transformers import Trainer, TrainingArguments

    from peftlab.config import validate
    from peftlab.specs import RunConfig
    from peftlab.tasks.prepare import collate

    torch.set_num_threads(threads)
    run = validate(RunConfig, config, "benchmark")
    spec = run.train
    model, data, pad_id = peft_model_and_data(run)
    collator = lambda rows: collate(rows, pad_id=pad_id)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        arguments = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=spec.batch_size, num_train_epochs=spec.epochs,
            learning_rate=spec.lr, lr_scheduler_type="linear", warmup_steps=spec.warmup_ratio, weight_decay=0.0, optim="adamw_torch",
            max_grad_norm=spec.max_grad_norm, seed=spec.seed, data_seed=spec.seed, logging_strategy="no",
            save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True)
        Trainer(model=model, args=arguments, train_dataset=data.train, data_collator=collator).train()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.test), 64):
            batch = collator(data.test[start:start + 64])
            labels = batch.pop("labels")
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
            correct += int((logits.argmax(-1).cpu() == labels).sum())
    return correct / len(data.test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--placement", default="attention")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep the peftlab runs here (default: a temporary directory)")
    args = parser.parse_args()

    from peftlab.analysis.stats import compare, holm, tost_p

    accuracy: dict[str, dict[int, float]] = {h: {} for h in HARNESSES}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        env = {"OMP_NUM_THREADS": str(args.threads)}
        for seed in range(args.seeds):
            accuracy["trainer"][seed] = trainer_accuracy(run_config(args, seed), args.threads)
            for harness, batching in (("peftlab-bucketed", "bucketed"), ("peftlab-random", "random")):
                result = peftlab_run(run_config(args, seed, batching), workdir, f"{harness}-{seed}", env)
                accuracy[harness][seed] = result["metrics"]["test"]["accuracy"]
            print(f"seed {seed}: " + ", ".join(f"{h} {accuracy[h][seed]:.4f}" for h in HARNESSES), flush=True)
    pairs = [("peftlab-bucketed", "trainer"), ("peftlab-random", "trainer"), ("peftlab-bucketed", "peftlab-random")]
    comparisons = [compare(accuracy[a], accuracy[b]) for a, b in pairs]
    # three unrelated pairs, not one baseline's family: each TOST on its own spread, Holm over the three
    p_difference, p_equivalence = holm([c.p for c in comparisons]), holm([tost_p(c, MARGIN) for c in comparisons])
    rows = []
    for (a, b), c, p, q in zip(pairs, comparisons, p_difference, p_equivalence):
        outcome = ("better" if c.difference > 0 else "worse") if p < 0.05 else ("equivalent" if q < 0.05 else "unresolved")
        rows.append({"candidate": a, "baseline": b, "n": c.n, "difference": c.difference, "ci95": [c.low, c.high],
                     "p_holm": p, "tost_p_holm": q, "verdict": outcome, "margin": MARGIN})
        print(f"{a} - {b}: {c.difference:+.4f} (95% CI {c.low:+.4f} to {c.high:+.4f}, n={c.n}), Holm p={p:.3f}, "
              f"TOST Holm p={q:.3f}: {outcome} (±{MARGIN:g})")
    means = {h: sum(values.values()) / len(values) for h, values in accuracy.items()}
    print("mean test accuracy: " + ", ".join(f"{h} {m:.4f}" for h, m in means.items()))
    append_result("reference", {"config": run_config(args, 0), "seeds": args.seeds, "accuracy": accuracy,
                                "means": means, "comparisons": rows})


if __name__ == "__main__":
    main()
