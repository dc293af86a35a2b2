import json
import os

# Tests never reach a hub: set before transformers / huggingface_hub read it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.config import validate
from peftlab.plans.plan import plan_on
from peftlab.specs import ModelSpec, PlanSpec

TINY = ("tiny-gpt2", "tiny-bert", "tiny-distilbert", "tiny-llama")


def make_plan(model: str, **plan):
    """Plan on a model skeleton from plain values, e.g. make_plan("tiny-gpt2", placement="attention")."""
    return plan_on(ModelSpec(name=model), validate(PlanSpec, plan, "test"))


ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, output: Path, processes: int) -> subprocess.CompletedProcess:
    """`accelerate launch` over `processes` processes (its multi-GPU launcher is torchrun; on a CPU, peftlab's
    accelerator starts a gloo process group)."""
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "peftlab", "run", "-c", str(config), "--output", str(output)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=config.parent)


def color_instructions(directory: Path) -> Path:
    """56 instruction rows of 1-3 prompt words and 1-4 response words (token counts vary between rows, so token-
    weighted losses differ from example means), in `directory/instruct.jsonl`."""
    data = directory / "instruct.jsonl"
    words = ["red", "blue", "green", "black", "white", "gray", "pink"]
    data.write_text("".join(json.dumps({"instruction": f"say {w} " * (1 + i % 3), "output": f"{w} " * (1 + i % 4)})
                            + "\n" for i, w in enumerate(words * 8)))
    return data


def run_to_dict(config, output_dir):
    """A run through the library's entry point (resolve, then execute), its result as result.json holds it."""
    from peftlab.api import run

    return run(config, output_dir).to_dict()


@pytest.fixture
def alpaca_file(tmp_path):
    """24 Alpaca-format rows whose response repeats a word of the instruction."""
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w} for w in ["apple", "river", "stone"] * 8]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A peftlab cache of the test's own (tokenized data, prefix caches, estimators, importance scores)."""
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))


WORDS = {"pos": ["tasty", "great", "lovely", "fresh"], "neg": ["stale", "awful", "bland", "soggy"]}


@pytest.fixture
def reviews_file(tmp_path):
    """120 two-word food reviews, pos and neg alternating (JSONL: text, label)."""
    rows = []
    for i in range(120):
        label = "pos" if i % 2 else "neg"
        words = WORDS[label]
        rows.append({"text": f"the food was {words[i % 4]} and {words[(i // 4) % 4]}", "label": label})
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def plan_for():
    return make_plan


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `peftlab ARGS...` in-process: (exit code, stdout, stderr)."""
    from peftlab.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["peftlab", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
