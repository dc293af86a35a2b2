"""The GPU checks in one go: speed against PEFT + Trainer, model-FLOPs utilisation, packing on vs off, QLoRA
memory, generation throughput and two-process scaling, in under ten minutes on one CUDA machine.

Each check runs one of the benchmark scripts (or `peftlab run`) in its own process with a time limit of its own;
a check that fails or runs out of time is recorded as such and the next one starts. Every script appends its own
figures to benchmarks/results/ as usual, and this one appends the summary (each check's status, seconds and
headline figures, the device and its peak) to benchmarks/results/gpu.jsonl.

    python benchmarks/gpu.py                    # on a CUDA machine with peftlab installed (.[dev,gemma])
    python benchmarks/gpu.py --only speed-gemma,generation
    python benchmarks/gpu.py --dry-run          # anywhere: every check on tiny models for a step or two, two at
                                                # a time, the figures into a temporary directory (the plumbing)

Model-FLOPs utilisation (MFU) is PaLM's: 6 x parameters x tokens/s over the device's dense bf16 peak; with a
frozen base, training computes about 4 x parameters per token (no weight gradients), so the hardware's share
is about two thirds of what MFU suggests. The 1B-class model is LLaMA-shaped with random weights (speed does
not depend on the values) and the bundled MiniLM tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "RTX 4090": 165e12}  # dense bf16 FLOP/s by device name, NVIDIA's data sheets
LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 30522, "max_position_embeddings": 4096,
            "tie_word_embeddings": True}  # 1.0B parameters


@dataclass
class Check:
    name: str
    what: str
    gpu: list[str]  # the command on a GPU
    dry: list[str]  # the same check on tiny models
    limit: int  # seconds on a GPU
    result: str | None = None  # the results file whose last record is this check's figures
    needs_gpus: int = 1
    figures: dict = field(default_factory=dict)


def checks(work: Path) -> list[Check]:
    llama_1b, tiny_config = work / "llama-1b.json", work / "tiny-llama.json"
    llama_1b.write_text(json.dumps(LLAMA_1B))
    tiny_config.write_text(json.dumps({**LLAMA_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "num_key_value_heads": 2}))
    speed = [sys.executable, str(HERE / "speed.py"), "--task", "reviews-instruct", "--placement", "all"]
    harnesses = ["--harnesses", "trainer,peftlab-random,peftlab-packed,peftlab"]
    tiny = ["--batch-size", "2", "--max-length", "32", "--steps", "2"]
    two = {"model": "gemma-3-270m", "task": {"name": "reviews-instruct", "max_length": 256},
           "train": {"max_steps": 30, "batch_size": 16, "latency_batches": 0}}
    tiny_two = {"model": "tiny-llama", "task": {"name": "reviews-instruct", "max_length": 32, "max_eval_examples": 8},
                "train": {"max_steps": 2, "batch_size": 4, "latency_batches": 0}}
    run = [sys.executable, "-m", "peftlab", "run"]

    def one_then_two(config: dict, name: str, device: list[str]) -> list[str]:
        """One process, then two data parallel, then two with sharded layers, each into its own directory:
        `scaling` compares them."""
        files = {sharding: work / f"{name}-{sharding}.yaml" for sharding in ("none", "fsdp")}
        for sharding, file in files.items():
            file.write_text(json.dumps({**config, "train": {**config["train"], "sharding": sharding}}))
        one = [*run, "-c", str(files["none"]), *device, "--output", str(work / "one-process")]
        two = [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *run[1:], "-c", str(files[sharding]), *device, "--output",
                str(work / directory)] for sharding, directory in (("none", "two-processes"), ("fsdp", "two-sharded"))]
        return ["bash", "-c", " && ".join(shlex.join(command) for command in (one, *two))]

    return [
        Check("speed-gemma", "Gemma 3 270M, all linear r=8: PEFT + Trainer vs peftlab, random / packed / bucketed",
              [*speed, *harnesses, "--model", "gemma-3-270m", "--batch-size", "16", "--max-length", "256", "--steps", "30"],
              [*speed, "--model", "tiny-llama", *tiny, "--harnesses", "trainer,peftlab-packed"], 150, "speed"),
        Check("speed-1b", "a 1B LLaMA shape (random weights), all linear r=8, bf16: the same harnesses",
              [*speed, *harnesses, "--model", str(llama_1b), "--batch-size", "8", "--max-length", "512", "--steps", "20"],
              [*speed, "--model", str(tiny_config), *tiny, "--harnesses", "peftlab-packed"], 180, "speed"),
        Check("qlora-memory", "QLoRA (NF4) against LoRA on fp32 and bf16 weights: base weights, peak, tokens/s",
              [sys.executable, str(HERE / "qlora_memory.py"), "--random-from", "llama-3.2-3b", "--task",
               "reviews-instruct", "--batch-size", "8", "--max-length", "256", "--steps", "10"],
              [sys.executable, str(HERE / "qlora_memory.py"), "--model", "tiny-llama", "--task", "reviews-instruct",
               *tiny], 150, "qlora_memory"),
        Check("generation", "Gemma 3 270M greedy generation, sdpa vs eager, batch 16 vs 64: tokens/s, same completions",
              [sys.executable, str(HERE / "generation.py"), "--examples", "128", "--max-new-tokens", "64",
               "--batch-sizes", "16,64", "--precision", "auto"],
              [sys.executable, str(HERE / "generation.py"), "--model", "tiny-llama", "--examples", "4",
               "--max-new-tokens", "2", "--batch-sizes", "2,4", "--precision", "fp32"], 90, "generation"),
        Check("two-processes", "one run over 2 GPUs (data parallel, then sharded layers) against the same run on "
              "one: tokens/s, peak memory per process",
              one_then_two(two, "two", []), one_then_two(tiny_two, "tiny-two", ["--device", "cpu"]),
              200, needs_gpus=2),
    ]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_peak() -> tuple[str | None, float | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name()
    return name, next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def last_record(results: Path, name: str | None, before: int) -> dict:
    """The record a check's script appended (none: {})."""
    file = results / f"{name}.jsonl"
    if name is None or not file.is_file():
        return {}
    lines = file.read_text().splitlines()
    return json.loads(lines[-1]) if len(lines) > before else {}


def headline(check: Check, record: dict, params: int | None, peak: float | None) -> dict:
    """The figures the summary keeps: tokens/s per harness and their ratios, MFU where the device's peak is known,
    or the script's own figures."""
    figures = record.get("figures")
    if check.result != "speed" or not isinstance(figures, dict):
        return {"figures": figures} if figures is not None else {}
    base = figures.get("trainer", {}).get("tokens_per_second")
    out = {}
    for harness, f in figures.items():
        row = {"tokens_per_second": round(f["tokens_per_second"], 1), "peak_memory_bytes": f["peak_memory_bytes"],
               "padding_fraction": round(f["padding_fraction"], 4)}
        if base:
            row["vs_trainer"] = round(f["tokens_per_second"] / base, 3)
        if params and peak:
            row["mfu"] = round(6 * params * f["tokens_per_second"] / peak, 4)
        out[harness] = row
    return {"harnesses": out, "params": params}


def scaling(work: Path) -> dict:
    """tokens/s and the main process's peak memory of the run over two processes (data parallel, sharded) against
    one (the global batch is the same)."""
    results = {name: json.loads((work / name / "result.json").read_text())
               for name in ("one-process", "two-processes", "two-sharded")}
    base = results["one-process"]["cost"]["tokens_per_second"]
    figures = {name: {"tokens_per_second": round(r["cost"]["tokens_per_second"], 1),
                      "speed_up": round(r["cost"]["tokens_per_second"] / base, 3),
                      "peak_memory_bytes": r["cost"]["peak_memory_bytes"],
                      "params_per_process": (r["environment"].get("sharding") or {}).get("params_per_process")}
               for name, r in results.items()}
    return {"runs": figures}


def base_params(model: str) -> int | None:
    """The model's parameters, planned on its skeleton (nothing loaded)."""
    done = subprocess.run([sys.executable, "-m", "peftlab", "plan", "--model", model, "--json"],
                          capture_output=True, text=True, check=False)
    return json.loads(done.stdout)["totals"]["base_params"] if done.returncode == 0 else None


def run_check(check: Check, dry: bool, results: Path, peak: float | None, work: Path) -> dict:
    """Run one check; its outcome for the summary. A dry run's checks run two at a time (they check the plumbing,
    not the time), each into a results directory of its own."""
    command = check.dry if dry else check.gpu
    if dry:
        results = results / check.name
        results.mkdir(parents=True, exist_ok=True)
    available = 2 if dry else gpu_count()
    if available < check.needs_gpus:
        return {"status": "skipped", "why": f"needs {check.needs_gpus} GPUs, {available} here"}
    before = len((results / f"{check.result}.jsonl").read_text().splitlines()) \
        if check.result and (results / f"{check.result}.jsonl").is_file() else 0
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=None if dry else check.limit,
                              env={**os.environ, "PEFTLAB_BENCHMARK_RESULTS": str(results)})
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "seconds": round(time.perf_counter() - start, 1), "limit": check.limit}
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return {"status": "failed", "seconds": seconds, "error": done.stderr.strip().splitlines()[-1:] or ["?"]}
    if check.name == "two-processes":
        return {"status": "done", "seconds": seconds, **scaling(work)}
    model = command[command.index("--model") + 1] if "--model" in command else None
    params = base_params(model) if check.result == "speed" and model and peak else None  # for MFU
    return {"status": "done", "seconds": seconds, **headline(check, last_record(results, check.result, before), params, peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models, a step or two, on whatever is here")
    parser.add_argument("--only", help="comma-separated check names")
    parser.add_argument("--results", type=Path, help="where figures go (default benchmarks/results; a dry run: a "
                                                     "temporary directory)")
    args = parser.parse_args()
    if not args.dry_run and not gpu_count():
        sys.exit("benchmarks/gpu.py: no CUDA device here; run it on a GPU machine, or --dry-run to check the plumbing")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = args.results or (work / "results" if args.dry_run else HERE / "results")
        results.mkdir(parents=True, exist_ok=True)
        device, peak = device_peak()
        wanted = set(args.only.split(",")) if args.only else None
        summary = {"dry_run": args.dry_run, "device": device, "peak_bf16_flops": peak, "checks": {}}
        total = time.perf_counter()
        chosen = [c for c in checks(work) if wanted is None or c.name in wanted]
        with ThreadPoolExecutor(max_workers=2 if args.dry_run else 1) as pool:
            outcomes = pool.map(lambda c: run_check(c, args.dry_run, results, peak, work), chosen)
            for check, outcome in zip(chosen, outcomes):
                summary["checks"][check.name] = outcome
                print(f"{check.name}: {check.what}\n  {outcome['status']}"
                      + (f" in {outcome['seconds']} s" if "seconds" in outcome else "")
                      + (f": {outcome.get('why') or outcome.get('error')}" if outcome["status"] != "done" else ""),
                      flush=True)
        summary["seconds"] = round(time.perf_counter() - total, 1)
        sys.path.insert(0, str(HERE))
        os.environ["PEFTLAB_BENCHMARK_RESULTS"] = str(results)
        import common

        common.RESULTS = results
        common.append_result("gpu", summary)
        print(json.dumps(summary, indent=2))
        print(f"figures appended to {results}")


if __name__ == "__main__":
    main()
