"""A whole study end to end: `peftlab study run` against the same runs done one by one with PEFT + Trainer.

Both sides run the study's first seeds at one rate (no tuning, no seeds until resolved: `fixed_runs`).
- peftlab: `peftlab study run STUDY --jobs N` from an empty cache (tokenization and prefix caches are
  built inside the measured time), every run in its own process, with evaluation, latency and saving;
- trainer: in one process, for every run of the study in turn: load the model, LoRA on exactly the
  plan's modules, `Trainer.train` with the run's epochs, batch size, learning rate, warmup, clipping and
  seed, then `Trainer.predict` on the validation and test splits (accuracy). It gets the tokenized
  examples for free (peftlab's cache, filled by the study).

Prints both wall times, their ratio, and the mean test accuracy per configuration from both (the runs
must learn alike for the times to compare). Figures go to benchmarks/results/study_speed.jsonl.

    python benchmarks/study_speed.py                       # the shipped placement study, 2 jobs
    python benchmarks/study_speed.py --precision bf16      # both sides with bf16 autocast (Trainer: bf16=True)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

from common import append_result


def trainer_runs(spec_file: Path, out: Path, limit: int | None = None) -> None:
    """Every run of the study, one by one, through PEFT + Trainer; per-run accuracy to `out`."""
    import numpy as np
    import torch
    from speed import peft_model_and_data
    from transformers import Trainer, TrainingArguments

    from peftlab.config import load_spec
    from peftlab.specs import RunConfig, StudySpec
    from peftlab.studies.grid import expand
    from peftlab.tasks.prepare import collate
    from peftlab.train.context import precision

    accuracies = []
    for run in expand(load_spec(StudySpec, spec_file))[:limit]:
        config = RunConfig.model_validate(run.config)
        spec = config.train
        torch.manual_seed(spec.seed)
        model, data, pad_id = peft_model_and_data(config)
        steps = math.ceil(spec.epochs * math.ceil(len(data.train) / spec.batch_size))
        with tempfile.TemporaryDirectory() as tmp:
            arguments = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=spec.batch_size, per_device_eval_batch_size=spec.eval_batch_size,
                num_train_epochs=spec.epochs, learning_rate=spec.lr, lr_scheduler_type=spec.schedule,
                warmup_steps=round(spec.warmup_ratio * steps), weight_decay=spec.weight_decay,
                max_grad_norm=spec.max_grad_norm or 0.0,
                seed=spec.seed, bf16=precision(spec.precision, "cuda" if torch.cuda.is_available() else "cpu") == "bf16", logging_strategy="no", save_strategy="no", report_to=[],
                disable_tqdm=True,
                use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
            trainer = Trainer(model=model, args=arguments, train_dataset=data.train,
                              data_collator=partial(collate, pad_id=pad_id))
            trainer.train()
            scores = {}
            for split in ("validation", "test"):
                predicted = trainer.predict(getattr(data, split))
                scores[split] = float(np.mean(predicted.predictions.argmax(-1) == predicted.label_ids))
        accuracies.append({"label": run.label, "seed": run.seed, **scores})
    out.write_text(json.dumps(accuracies))


def fixed_runs(spec: dict) -> dict:
    """The study as fixed runs, the same on both sides: its first seeds, without seeds until resolved, and
    without tuning, at the middle rate of its grid (a configuration's own rate for a grid of factors)."""
    tune = spec.pop("tune", None)
    if tune and tune.get("lr"):
        rates = sorted(tune["lr"])
        spec["base"].setdefault("train", {})["lr"] = rates[len(rates) // 2]
    if isinstance(spec.get("seeds"), dict):
        spec["seeds"] = list(range(spec["seeds"]["min"]))
    spec.pop("until_resolved", None)
    return spec


def mean_by_label(rows: list[dict]) -> dict[str, float]:
    groups = defaultdict(list)
    for row in rows:
        groups[row["label"]].append(row["test"])
    return {label: sum(v) / len(v) for label, v in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="placement")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="train.precision for every run (both sides)")
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)  # with --trainer-only: the study spec
    parser.add_argument("--trainer-only", type=Path, help=argparse.SUPPRESS)  # the baseline, in a child process
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)  # with --trainer-only: the first N runs
    args = parser.parse_args()
    if args.trainer_only:
        trainer_runs(args.spec, args.trainer_only, args.limit)
        return

    import yaml

    from peftlab.studies.shipped import shipped_study

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = fixed_runs(yaml.safe_load(shipped_study(args.study).read_text()))
        if args.precision:
            spec["base"].setdefault("train", {})["precision"] = args.precision
        spec_file = work / f"{args.study}.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        env = {**os.environ, "PEFTLAB_CACHE": str(work / "cache")}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "peftlab", "study", "run", str(spec_file), "--dir", str(work / "study"),
                        "--jobs", str(args.jobs)], check=True, env=env, stdout=subprocess.DEVNULL)
        peftlab_seconds = time.perf_counter() - start
        from peftlab.records.store import Store

        done = [r for r in Store(work / "study" / "study.db").rows() if r["status"] == "done"]
        ours = mean_by_label([{"label": r["label"], "test": json.loads(r["result"])["metrics"]["test"]["accuracy"]}
                              for r in done])
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--spec", str(spec_file), "--trainer-only", str(work / "trainer.json")],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        trainer_seconds = time.perf_counter() - start
        theirs = mean_by_label(json.loads((work / "trainer.json").read_text()))

    print(f"\nstudy {args.study} (precision {args.precision or 'as the study sets it'}): {len(done)} runs")
    print(f"peftlab study run --jobs {args.jobs}: {peftlab_seconds:,.0f} s")
    print(f"PEFT + Trainer, one by one:   {trainer_seconds:,.0f} s")
    print(f"peftlab is {trainer_seconds / peftlab_seconds:.2f}x faster end to end")
    print(f"{'configuration':<40} {'peftlab acc':>12} {'Trainer acc':>12}")
    for label in ours:
        print(f"{label:<40} {ours[label]:>12.3f} {theirs.get(label, float('nan')):>12.3f}")
    append_result("study_speed", {"study": args.study, "jobs": args.jobs, "precision": args.precision, "runs": len(done),
                                  "peftlab_seconds": peftlab_seconds, "trainer_seconds": trainer_seconds,
                                  "speedup": trainer_seconds / peftlab_seconds,
                                  "test_accuracy": {"peftlab": ours, "trainer": theirs}})


if __name__ == "__main__":
    main()
