"""Standard benchmarks through lm-evaluation-harness (`eval.benchmarks`), on the model already in memory.

lm-eval's `HFLM` wraps the run's own model and tokenizer (never a second load), so the adapted model is scored
as it would be served (merged where the method merges) and the base model under the method's bypass. Scores
come back as {task: {metric: value, metric_stderr: value}} (a run stores them as `metrics.benchmarks`), with
each task's version; every scored example goes to the run's benchmarks.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import PeftlabError
from peftlab.files import write_atomic

if TYPE_CHECKING:
    from torch import nn

    from peftlab.specs import BenchmarksSpec

SAMPLES_FILE = "benchmarks.jsonl"
BUNDLED_TASKS = Path(__file__).resolve().parent.parent / "catalog" / "benchmarks"  # peftlab's own, offline
CACHE_VERSION = 2  # 2: multiple-choice answer counts beside the scores


@dataclass
class BenchmarkScores:
    scores: dict[str, dict[str, float]]  # task -> metric -> value (and metric_stderr)
    versions: dict[str, Any]  # task -> its version in lm-eval
    seconds: float
    samples: list[dict[str, Any]]  # one per scored example: task, doc id, target, response, metrics

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "versions": self.versions, "seconds": self.seconds, "samples": self.samples}


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise PeftlabError("eval.benchmarks needs lm-evaluation-harness: pip install 'peftlab[bench]'") from None


def check_tasks(spec: BenchmarksSpec) -> None:
    """Every task name is one lm-eval knows (its own, or a YAML file of `include`): before the run trains."""
    manager = _task_manager(spec)
    unknown = [name for name in spec.tasks if name not in manager.all_tasks]
    if unknown:
        raise PeftlabError(f"eval.benchmarks.tasks: {', '.join(map(repr, unknown))} not a task lm-evaluation-harness "
                           f"knows{' (nor one in ' + str(spec.include) + ')' if spec.include else ''}; "
                           "list them with `lm-eval ls tasks`")


def _task_manager(spec: BenchmarksSpec):
    require_lm_eval()
    if spec.include is not None and not spec.include.is_dir():
        raise PeftlabError(f"eval.benchmarks.include: {spec.include} is not a folder of task YAML files")
    return _indexed_tasks(str(spec.include.resolve()) if spec.include else None)


@cache
def _indexed_tasks(include: str | None):
    """lm-eval's task index (its own tasks, peftlab's bundled ones and `include`'s), built once per process:
    indexing takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(BUNDLED_TASKS)] + ([include] if include else []))


def score_benchmarks(model: nn.Module, tokenizer: Any, spec: BenchmarksSpec, device: Any) -> BenchmarkScores:
    """`spec.tasks` scored on `model` in evaluation mode (its mode restored after), with fixed seeds."""
    from lm_eval import simple_evaluate

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    quiet = logging.getLogger("lm-eval"), logging.getLogger("lm_eval")
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        lm = _language_model(model, tokenizer, spec.batch_size, device)
        out = simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit,
                              task_manager=_task_manager(spec), log_samples=True,
                              apply_chat_template=spec.chat_template, random_seed=0, numpy_random_seed=0,
                              torch_random_seed=0, fewshot_random_seed=0)
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
        model.train(was_training)
    scores = _scores(out["results"])
    for task, stats in _answer_stats(out.get("samples") or {}).items():
        scores.setdefault(task, {}).update(stats)
    return BenchmarkScores(scores, dict(out.get("versions") or {}), time.perf_counter() - start,
                           _samples(out.get("samples") or {}))


def _language_model(model: nn.Module, tokenizer: Any, batch_size: int, device: Any):
    """lm-eval's `HFLM` around the model in memory. Its end of text is the one peftlab trains responses to end
    with (the tokenizer's EOS, else its SEP: BERT-style tokenizers have no EOS), and so is the token put before a
    loglikelihood's context where the tokenizer has no BOS."""
    from lm_eval.models.huggingface import HFLM

    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    class PeftlabLM(HFLM):
        @property
        def eot_token_id(self) -> int:
            return end

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else end
    return PeftlabLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                     prefix_token_id=prefix)


def _scores(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's `{"acc,none": 0.5, "acc_stderr,none": 0.1}` as {"acc": 0.5, "acc_stderr": 0.1}; a filter other
    than `none` is kept in the name (`exact_match_strict-match`)."""
    scores: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filtered = key.partition(",")
            name = metric if filtered == "none" else f"{metric.removesuffix('_stderr')}_{filtered}" + (
                "_stderr" if metric.endswith("_stderr") else "")
            scores.setdefault(task, {})[name] = float(value) if math.isfinite(float(value)) else math.nan
    return scores


def _answer_stats(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per multiple-choice task (each scored example's responses one (loglikelihood, is greedy) pair per choice and
    its target a choice's index): `count`, `majority_rate` (the share of the commonest right answer) and
    `predicted_choices` (how many different answers the model gave), from which `records.degenerate` tells a
    model that gives one answer to everything."""
    stats = {}
    for task, logged in samples.items():
        targets, answers = [], []
        for sample in logged:
            choices, target = sample.get("filtered_resps"), sample.get("target")
            target = int(target) if isinstance(target, str) and target.isdigit() else target
            if not isinstance(target, int) or not isinstance(choices, list) or len(choices) < 2 or not all(
                    isinstance(c, (list, tuple)) and c and isinstance(c[0], (int, float)) for c in choices):
                break  # not a multiple-choice task
            likelihoods = [float(c[0]) for c in choices]
            targets.append(target)
            answers.append(likelihoods.index(max(likelihoods)))
        else:
            if targets:
                stats[task] = {"count": float(len(targets)), "predicted_choices": float(len(set(answers))),
                               "majority_rate": max(map(targets.count, set(targets))) / len(targets)}
    return stats


def _samples(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for task, logged in samples.items():
        for sample in logged:
            rows.append({"task": task, "doc_id": sample.get("doc_id"), "target": str(sample.get("target")),
                         "response": json.loads(json.dumps(sample.get("filtered_resps"), default=str)),
                         **{k: v for k, v in sample.items() if isinstance(v, (int, float)) and k != "doc_id"}})
    return rows


def write_benchmark_samples(path: Path, adapted: BenchmarkScores, base: BenchmarkScores | None) -> None:
    """One line per scored example of the adapted model (and of the base model, marked)."""
    rows = [{"model": "adapted", **row} for row in adapted.samples]
    rows += [{"model": "base", **row} for row in (base.samples if base else [])]
    write_atomic(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def base_key(model_identity: dict[str, Any], spec: BenchmarksSpec) -> str:
    """What the base model's scores depend on: the model and how it computes, the benchmark settings, the task
    files (peftlab's and `include`'s) and lm-eval's version (task versions are recorded beside the scores)."""
    from importlib.metadata import version

    include = [(str(p.relative_to(folder)), hashlib.sha256(p.read_bytes()).hexdigest())
               for folder in [BUNDLED_TASKS] + ([spec.include] if spec.include else [])
               for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    content = {"model": model_identity, "benchmarks": spec.model_dump(mode="json", exclude={"base", "include"}),
               "include": include, "lm_eval": version("lm-eval"), "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_cached(file: Path) -> BenchmarkScores | None:
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    return BenchmarkScores(data["scores"], data["versions"], data["seconds"], data["samples"])


def write_cached(file: Path, scores: BenchmarkScores) -> None:
    write_atomic(file, json.dumps(scores.to_dict(), default=str))
