"""What the benchmark scripts share: `peftlab run` in its own process, machine info, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# where figures are appended; a dry run (benchmarks/gpu.py --dry-run) points it elsewhere
RESULTS = Path(os.environ.get("PEFTLAB_BENCHMARK_RESULTS") or Path(__file__).parent / "results")
MiB = 2**20


def peftlab_run(config: dict[str, Any], workdir: Path, name: str, env: dict[str, str] | None = None,
                processes: int = 1) -> dict[str, Any]:
    """`peftlab run` on `config` in a fresh process (over `processes` processes with torchrun); its result record."""
    path, out = workdir / f"{name}.yaml", workdir / name
    path.write_text(yaml.safe_dump(config))
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    subprocess.run([*launcher, "-m", "peftlab", "run", "--config", str(path), "--output", str(out)],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return json.loads((out / "result.json").read_text())


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__}


def append_result(benchmark: str, record: dict[str, Any]) -> None:
    """One line in benchmarks/results/BENCHMARK.jsonl, with the time and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    full = {"benchmark": benchmark, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record, "machine": machine()}
    with (RESULTS / f"{benchmark}.jsonl").open("a") as handle:
        handle.write(json.dumps(full) + "\n")


def run_arguments(description: str, *, steps: int, batch_size: int, placement: str | None = "all") -> argparse.ArgumentParser:
    """A parser with the options the benchmarks share: model, data, plan, steps, batch and length
    (no --placement when the benchmark fixes the placements itself)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="reviews")
    parser.add_argument("--data", help="a data file instead of --task")
    parser.add_argument("--kind", default="instruction", help="with --data: instruction or classification")
    if placement is not None:
        parser.add_argument("--placement", default=placement)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--max-length", type=int, default=128)
    return parser


def task_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The run config's task from --data/--kind or --task."""
    return {"path": str(Path(args.data).resolve()), "kind": args.kind} if args.data else {"name": args.task}


def peft_model_and_data(config):
    """The model with LoRA on exactly the plan's modules (what peftlab builds), and the tokenized data."""
    from peft import LoraConfig, get_peft_model

    from peftlab.methods.lora import peft_task_type
    from peftlab.models.load import (
        count_params,
        head_modules,
        load_model,
        load_tokenizer,
        model_spec_for_task,
    )
    from peftlab.models.sites import resolve_sites
    from peftlab.plans.peft_export import lora_config_kwargs
    from peftlab.plans.plan import build_plan
    from peftlab.tasks.kinds import task_kind
    from peftlab.tasks.prepare import load_task

    tokenizer = load_tokenizer(config.model)
    data = load_task(config.task, tokenizer, config.train.examples_drawn)  # the examples a peftlab run tokenizes
    kind = task_kind(data.kind)
    spec = model_spec_for_task(config.model, kind.head, kind.num_labels(data.labels))
    model = load_model(spec, seed=config.train.seed)
    plan = build_plan(resolve_sites(model), count_params(model), config.plan, spec.name)
    lora = LoraConfig(task_type=peft_task_type(model), **lora_config_kwargs(plan, modules_to_save=head_modules(model) or None))
    return get_peft_model(model, lora), data, tokenizer.pad_token_id


def random_model(name: str, directory: Path, tokenizer: str | None) -> Path:
    """A LLaMA-style model with the dimensions of catalog architecture `name`, random weights and a
    30,522-token vocabulary: the bundled MiniLM tokenizer, or the one in the directory `tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from peftlab.models.load import load_config, load_tokenizer
    from peftlab.specs import ModelSpec

    source = load_config(ModelSpec(name=name))
    config = LlamaConfig(
        vocab_size=30522, hidden_size=source.hidden_size, intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
        num_key_value_heads=getattr(source, "num_key_value_heads", source.num_attention_heads),
        tie_word_embeddings=getattr(source, "tie_word_embeddings", False), max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    words = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else load_tokenizer(ModelSpec(name="tiny-llama"))
    words.save_pretrained(directory)
    return directory
