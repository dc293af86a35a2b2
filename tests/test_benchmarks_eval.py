"""Standard benchmarks through lm-evaluation-harness (`eval.benchmarks`), offline: task files of the test's own
over local data (multiple choice, loglikelihood, generate-until), on a tiny causal LM."""

import json
import os
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.specs import PlanSpec, RunConfig, TaskSpec, TrainSpec
from peftlab.train.benchmarks import read_cached

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("private_cache")

TASKS = {
    "tiny_mc": ("multiple_choice", 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
                "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"),
    "tiny_ll": ("loglikelihood", 'doc_to_text: "{{question}}"\ndoc_to_target: " {{choices[answer]}}"\n'
                "metric_list:\n  - metric: perplexity\n  - metric: acc\n"),
    "tiny_gen": ("generate_until", 'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{choices[answer]}}"\n'
                 "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
                 "metric_list:\n  - metric: exact_match\n"),
}


@pytest.fixture
def task_folder(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(12)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, (kind, body) in TASKS.items():
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\n"
            f"test_split: test\noutput_type: {kind}\n{body}metadata:\n  version: 1.0\n")
    return folder


def config(alpaca_file, task_folder, **benchmarks):
    return RunConfig.model_validate({
        "model": "tiny-llama", "task": TaskSpec(path=alpaca_file, kind="instruction", max_eval_examples=8),
        "plan": PlanSpec(allocation=2), "train": TrainSpec(max_steps=2, batch_size=4, latency_batches=0),
        "eval": {"benchmarks": {"tasks": list(TASKS), "include": str(task_folder), "limit": 6, "batch_size": 4,
                                **benchmarks}}})


def test_a_run_scores_its_benchmarks_beside_the_base_model_s_and_caches_the_base_s(tmp_path, alpaca_file, task_folder):
    from conftest import run_to_dict

    result = run_to_dict(config(alpaca_file, task_folder), tmp_path / "run")
    assert result["status"] == "done", result["error"]
    scores = result["metrics"]["benchmarks"]
    assert set(scores) == set(TASKS)
    assert 0 <= scores["tiny_mc"]["acc"] <= 1 and scores["tiny_mc"]["acc_stderr"] >= 0
    assert "base_acc" in scores["tiny_mc"] and "exact_match" in scores["tiny_gen"] and "perplexity" in scores["tiny_ll"]
    assert result["data"]["benchmark_versions"]["tiny_mc"] == 1.0 and result["cost"]["benchmark_seconds"] > 0
    samples = [json.loads(line) for line in (tmp_path / "run" / "benchmarks.jsonl").read_text().splitlines()]
    assert {s["model"] for s in samples} == {"adapted", "base"} and {s["task"] for s in samples} == set(TASKS)
    assert sum(s["model"] == "adapted" and s["task"] == "tiny_mc" for s in samples) == 6  # the limit
    (cached,) = (Path(os.environ["PEFTLAB_CACHE"]) / "benchmarks").glob("*.json")  # the base's scores, for the next run
    assert read_cached(cached).scores["tiny_mc"]["acc"] == scores["tiny_mc"]["base_acc"]


def test_an_unknown_benchmark_is_refused_before_anything_trains(tmp_path, alpaca_file, task_folder):
    from peftlab.api import run

    bad = config(alpaca_file, task_folder, tasks=["tiny_mc", "no_such_task"])
    with pytest.raises(PeftlabError, match="eval.benchmarks.tasks: 'no_such_task' not a task"):
        run(bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_benchmarks_need_a_causal_lm_task():
    from peftlab.config import validate

    with pytest.raises(PeftlabError, match="eval.benchmarks apply to instruction tasks"):
        validate(RunConfig, {"eval": {"benchmarks": ["arc_easy"]}}, "run.yaml")
    assert validate(RunConfig, {"task": "reviews-instruct", "model": "tiny-llama",
                                "eval": {"benchmarks": "arc_easy"}}, "run.yaml").eval.benchmarks.tasks == ["arc_easy"]


def test_peftlab_s_own_benchmark_is_known_offline_with_balanced_labels():
    """`peftlab_reviews_sentiment` needs no `include`: the bundled reviews' test split, balanced and alternating, each
    doc's target the index of its label's answer."""
    from peftlab.specs import BenchmarksSpec
    from peftlab.train.benchmarks import _task_manager, check_tasks

    spec = BenchmarksSpec(tasks=["peftlab_reviews_sentiment"])
    check_tasks(spec)
    task = _task_manager(spec).load(spec.tasks)["tasks"]["peftlab_reviews_sentiment"]
    docs = list(task.test_docs())
    targets = [task.doc_to_target(doc) for doc in docs]
    assert len(docs) == 548 and targets.count(0) == targets.count(1) == 274
    assert targets[:4] == [0, 1, 0, 1] and all(len(doc["text"]) <= 600 for doc in docs)
    assert all(t == (0 if doc["label"] == "great" else 1) for t, doc in zip(targets, docs))
    assert task.doc_to_choice(docs[0]) == ["positive", "negative"]
    assert task.doc_to_text(docs[0]) == f"Review: {docs[0]['text']}\nQuestion: Is this review positive or negative?\nAnswer:"


def test_a_benchmark_answered_blindly_is_degenerate():
    """Multiple-choice answer counts (from lm-eval's per-example likelihoods) and the verdict-side check: one
    answer to everything, or an accuracy within noise of always giving the commonest right answer."""
    from peftlab.records.degenerate import degenerate_reason
    from peftlab.train.benchmarks import _answer_stats

    one = [-1.0, False], [-2.0, False]
    logged = [{"target": t, "filtered_resps": list(one)} for t in [0, 1] * 50]  # always answers 0
    stats = _answer_stats({"mc": logged, "gen": [{"target": "4", "filtered_resps": ["4"]}]})
    assert stats == {"mc": {"count": 100.0, "predicted_choices": 1.0, "majority_rate": 0.5}}
    row = {f"metrics.benchmarks.mc.{k}": v for k, v in {**stats["mc"], "acc": 0.5}.items()}
    assert degenerate_reason(row, benchmark="mc") == "benchmark mc: gives one answer to every question"
    row["metrics.benchmarks.mc.predicted_choices"] = 2
    assert "accuracy 0.550 within noise" in degenerate_reason({**row, "metrics.benchmarks.mc.acc": 0.55}, benchmark="mc")
    assert degenerate_reason({**row, "metrics.benchmarks.mc.acc": 0.7}, benchmark="mc") is None
    assert degenerate_reason(row) is None  # a study judged by another metric does not read it
