"""Training speed of one LoRA configuration through four harnesses, in one invocation:

- trainer:        PEFT + transformers `Trainer` (the usual way), with the same tokenized examples,
                  padding, batch size, steps, learning rate, schedule and seed;
- bare:           the same PEFT model in a plain PyTorch loop (`model(**batch).loss`, AdamW, linear
                  schedule), random batches like the Trainer's;
- peftlab-random: `peftlab run` with random batches: against `bare`, the harness's own overhead;
- peftlab:        `peftlab run` as it runs by default (length-bucketed batches; for causal LMs, logits only
                  at supervised positions), against `trainer`: what a user gains;
- peftlab-compile (on request): the same with `train.compile: true`, compilation time included;
- peftlab-packed (on request, instruction data): `train.batching: packed`, random's batches without padding.

`--precision` applies to every harness (the Trainer's `bf16` / `fp16` where it resolves to them on a GPU).

With `--repeats N` the harnesses run N times, interleaved, and the median step time of each is kept
(shared machines are noisy: a few percent between identical runs).

Each runs in its own process (on a CPU the peak memory is the process's peak RSS, on a GPU the peak
allocated memory). The script prints tokens/s, time per optimizer step, padding and peak memory, with
ratios to the Trainer baseline and peftlab's overhead against the bare loop, and appends the figures
with the machine they came from to benchmarks/results/speed.jsonl.

    python benchmarks/speed.py                                   # minilm-l6 + reviews, attention r=8
    python benchmarks/speed.py --model gemma-3-270m --task reviews-instruct --batch-size 8 --steps 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from common import MiB, append_result, peft_model_and_data, run_arguments, task_spec

HARNESSES = ("trainer", "bare", "peftlab-random", "peftlab", "peftlab-compile", "peftlab-packed")
DEFAULT = "trainer,bare,peftlab-random,peftlab"


def run_config(args: argparse.Namespace):
    from peftlab.config import validate
    from peftlab.specs import RunConfig

    task = task_spec(args)
    return validate(RunConfig, {
        "model": args.model,
        "task": {**task, "max_length": args.max_length, "max_eval_examples": 8},
        "plan": {"placement": args.placement, "allocation": args.rank},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                  "warmup_ratio": 0.0, "max_grad_norm": None, "latency_batches": 0, "log_every": args.steps,
                  "precision": args.precision},
    }, "benchmark")


def trainer_precision(requested: str, device: str) -> str:
    """The autocast a peftlab run of `train.precision` uses on a GPU, for the Trainer to match (CPU: none)."""
    if device != "cuda":
        return "no"
    from peftlab.train.context import precision

    return precision(requested, device)


def measure(harness: str, config) -> dict:
    """Train with one harness in this process; return its figures."""
    import torch

    from peftlab.tasks.prepare import collate
    from peftlab.train.device import memory_in_use, peak_memory, reset_peak_memory

    spec = config.train
    if harness.startswith("peftlab"):
        from peftlab.api import run as run_peftlab

        changes = {"peftlab-random": {"batching": "random"}, "peftlab-compile": {"compile": True},
                   "peftlab-packed": {"batching": "packed"}}.get(harness, {})
        config = config.model_copy(update={"train": spec.model_copy(update=changes)})
        with tempfile.TemporaryDirectory() as tmp:
            cost = run_peftlab(config, Path(tmp) / "run").cost
        return {"tokens": cost.train_tokens, "seconds": cost.train_seconds, "steps": cost.steps,
                "padding_fraction": cost.padding_fraction,
                "peak_memory_bytes": cost.peak_memory_bytes, "peak_memory_kind": cost.peak_memory_kind}

    torch.manual_seed(spec.seed)
    before = memory_in_use()  # as in a peftlab run: the model's weights count, the interpreter does not
    model, data, pad_id = peft_model_and_data(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    collator = partial(collate, pad_id=pad_id)
    tokens = positions = 0

    def counted(examples):
        nonlocal tokens, positions
        batch = collator(examples)
        tokens += int(batch["attention_mask"].sum())
        positions += batch["attention_mask"].numel()
        return batch

    reset_peak_memory()
    mixed = trainer_precision(spec.precision, device)
    if harness == "trainer":
        from transformers import Trainer, TrainingArguments

        with tempfile.TemporaryDirectory() as tmp:
            arguments = TrainingArguments(
                bf16=mixed == "bf16", fp16=mixed == "fp16",
                output_dir=tmp, per_device_train_batch_size=spec.batch_size, max_steps=spec.max_steps,
                learning_rate=spec.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                seed=spec.seed, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=device == "cpu",
                dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
            trainer = Trainer(model=model, args=arguments, train_dataset=data.train, data_collator=counted)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
    else:
        from torch.utils.data import DataLoader
        from transformers import get_scheduler

        model.to(device).train()
        from peftlab.train.batching import Batches

        # the random batches peftlab-random draws: the overhead is measured on identical batches
        lengths = [len(e["input_ids"]) for e in data.train]
        loader = DataLoader(data.train, batch_sampler=Batches(lengths, spec.batch_size, spec.seed, bucketed=False),
                            collate_fn=counted)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=0.0)
        scheduler = get_scheduler("linear", optimizer, 0, spec.max_steps)
        start, step = time.perf_counter(), 0
        while step < spec.max_steps:
            for batch in loader:
                with torch.autocast(device, dtype=torch.float16 if mixed == "fp16" else torch.bfloat16,
                                    enabled=mixed in ("bf16", "fp16")):
                    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step == spec.max_steps:
                    break
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    memory = peak_memory(before)
    return {"tokens": tokens, "seconds": seconds, "steps": spec.max_steps, "padding_fraction": 1 - tokens / positions,
            "peak_memory_bytes": memory.training, "peak_memory_kind": memory.kind}


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0], steps=40, batch_size=16, placement="attention")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--harnesses", default=DEFAULT, help=f"comma-separated, from {', '.join(HARNESSES)}")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--precision", default="auto", help="train.precision of every harness")
    parser.add_argument("--only", choices=HARNESSES, help=argparse.SUPPRESS)  # one harness, in a child process
    args = parser.parse_args()
    config = run_config(args)
    if args.only:
        print(json.dumps(measure(args.only, config)))
        return

    runs = {harness: [] for harness in args.harnesses.split(",")}
    for _ in range(args.repeats):
        for harness, done in runs.items():
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", harness],
                                   capture_output=True, text=True, check=False)
            if child.returncode != 0:
                sys.exit(f"{harness} failed:\n{child.stderr[-3000:]}")
            done.append(json.loads(child.stdout.strip().splitlines()[-1]))
    figures = {}
    for harness, done in runs.items():
        median = sorted(done, key=lambda f: f["seconds"])[len(done) // 2]
        figures[harness] = {**median, "tokens_per_second": median["tokens"] / median["seconds"],
                            "step_ms": 1000 * median["seconds"] / median["steps"],
                            "all_step_ms": [1000 * f["seconds"] / f["steps"] for f in done]}

    base = figures.get("trainer") or next(iter(figures.values()))
    base_name = next(k for k in figures if figures[k] is base)
    print(f"\n{args.model} + {args.data or args.task}: {args.placement} r={args.rank}, {args.steps} steps, "
          f"batch {args.batch_size} x <= {args.max_length} tokens; ratios against {base_name}")
    print(f"{'harness':<15} {'tokens/s':>9} {'ratio':>6} {'ms/step':>8} {'padding':>8} {'peak MiB':>9} {'ratio':>6}")
    for harness, f in figures.items():
        print(f"{harness:<15} {f['tokens_per_second']:>9,.0f} {f['tokens_per_second'] / base['tokens_per_second']:>6.2f} "
              f"{f['step_ms']:>8,.0f} {f['padding_fraction']:>8.1%} {f['peak_memory_bytes'] / MiB:>9,.0f} "
              f"{f['peak_memory_bytes'] / base['peak_memory_bytes']:>6.2f}")
    overhead = None
    if "bare" in figures and "peftlab-random" in figures:
        overhead = figures["peftlab-random"]["step_ms"] / figures["bare"]["step_ms"] - 1
        print(f"peftlab's harness overhead against the bare PEFT loop (same random batches): {overhead:+.1%} per step")
    append_result("speed", {
        "model": args.model, "task": args.data or args.task, "placement": args.placement, "rank": args.rank,
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "repeats": args.repeats,
        "figures": figures,
        "overhead_vs_bare": overhead})


if __name__ == "__main__":
    main()
