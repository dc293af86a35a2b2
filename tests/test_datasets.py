"""Datasets by id: a configuration (`glue:sst2`), a revision, column names mapped to the task's, and a test split
streamed where only its first rows are read. Local dataset directories stand in for Hub ids (the same path)."""

import json
import uuid

import pytest

from peftlab.errors import PeftlabError
from peftlab.models.load import load_tokenizer
from peftlab.provenance import input_identity
from peftlab.specs import DatasetSpec, ModelSpec, RunConfig, TaskSpec
from peftlab.tasks.prepare import load_task

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(name="tiny-gpt2"))


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def glue_like(tmp_path):
    """A dataset with two configurations, as GLUE has: sst2 (sentence, label) and mrpc (sentence1, sentence2)."""
    root = tmp_path / f"glue-{uuid.uuid4().hex[:8]}"  # datasets caches a local directory by its name
    for config, n in (("sst2", 40), ("mrpc", 40)):
        for split, count in (("train", n), ("validation", 20)):
            rows = [{"text": f"{config} movie {i} was {'good' if i % 2 else 'bad'}", "label": i % 2,
                     "sentence1": f"first {i}", "sentence2": f"second {i}"} for i in range(count)]
            write(root / config / f"{split}.jsonl", rows)
    configs = "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
                      f"  - split: validation\n    path: {c}/validation.jsonl\n" for c in ("sst2", "mrpc"))
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    return root


def test_an_id_with_a_configuration_reads_that_configuration(glue_like, tokenizer):
    spec = TaskSpec(dataset=f"{glue_like}:mrpc", kind="classification", text_column="sentence1",
                    text_pair_column="sentence2", test_split="validation", max_eval_examples=5)
    assert spec.dataset == DatasetSpec(path=str(glue_like), name="mrpc")
    data = load_task(spec, tokenizer)
    assert len(data.test) == 5  # the first rows, streamed
    assert len(data.train) + len(data.validation) == 40


def test_columns_map_the_data_to_the_task(glue_like, tmp_path, tokenizer):
    rows = [{"query": f"what is {i} + {i}?", "response": f"{2 * i}", "type": "math"} for i in range(30)]
    folder = tmp_path / f"metamath-{uuid.uuid4().hex[:8]}"
    write(folder / "train.jsonl", rows)
    spec = TaskSpec(dataset={"path": str(folder), "columns": {"instruction": "query", "output": "response"}},
                    kind="instruction")
    data = load_task(spec, tokenizer)
    assert len(data.train) + len(data.validation) + len(data.test) == 30
    wrong = spec.model_copy(update={"dataset": DatasetSpec(path=str(folder), columns={"output": "answer"})})
    with pytest.raises(PeftlabError, match=r"dataset.columns names 'answer', which the data does not have \(its columns: "
                                           r"query, response, type\)"):
        load_task(wrong, tokenizer)


def test_a_plain_id_keeps_its_run_id_and_a_pinned_one_records_its_revision():
    plain = RunConfig.model_validate({"task": {"dataset": "imdb", "kind": "classification"}})
    assert plain.model_dump(mode="json")["task"]["dataset"] == "imdb"  # dumped as before the mapping existed
    pinned = RunConfig.model_validate({"task": {"dataset": {"path": "glue", "name": "sst2", "revision": "abc123"},
                                                "kind": "classification"}})
    identity = input_identity(pinned.model_dump(mode="json"))
    assert identity["task.dataset"] == "hub:glue:sst2@abc123"
    assert input_identity(plain.model_dump(mode="json"))["task.dataset"] == "hub:imdb@unpinned"


def test_the_command_line_names_a_dataset_by_id_and_configuration(glue_like, cli, tmp_path):
    code, _, err = cli("run", "--model", "tiny-bert", "--dataset", f"{glue_like}:sst2", "--kind", "classification",
                       "--max-steps", "1", "--batch-size", "4", "--output", tmp_path / "run")
    assert code == 0, err
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["config"]["task"]["dataset"] == f"{glue_like}:sst2" and result["status"] == "done"


def test_glue_tasks_are_judged_by_their_published_metric_and_the_docs_show_the_same_table():
    from pathlib import Path

    from peftlab.records.results import primary_metric
    from peftlab.tasks.glue import GLUE, glue_task

    readme = (Path(__file__).parents[1] / "docs" / "tutorials" / "published-results.md").read_text()
    for task in GLUE.values():
        columns = task.text + (f", {task.pair}" if task.pair else "")
        assert f"| {task.name} | {task.kind} | {columns} | {task.test_split} | {', '.join(task.metrics)} |" in readme
        spec = TaskSpec.model_validate(task.task(max_length=64))
        assert glue_task(spec.model_dump(mode="json")) == task
    assert primary_metric([{"kind": "classification", "benchmark": "glue/cola"}])[0] == "metrics.test.mcc"
    assert primary_metric([{"kind": "regression", "benchmark": "glue/stsb"}])[0] == "metrics.test.pearson"
    assert primary_metric([{"kind": "classification", "benchmark": None}])[0] == "metrics.test.accuracy"


@pytest.mark.parametrize("dataset, kind, columns, split", [
    ("glue:mrpc", "classification", ("sentence1", "sentence2"), "validation"),
    ({"path": "nyu-mll/glue", "name": "stsb"}, "regression", ("sentence1", "sentence2"), "validation"),
    ("glue:mnli", "classification", ("premise", "hypothesis"), "validation_matched"),
    ("glue:cola", "classification", ("sentence", None), "validation"),
])
def test_a_glue_dataset_brings_its_kind_columns_and_scored_split(dataset, kind, columns, split):
    from peftlab.config import validate
    from peftlab.specs import RunConfig

    task = validate(RunConfig, {"model": "tiny-bert", "task": {"dataset": dataset}}, "t").task
    assert (task.kind, (task.text_column, task.text_pair_column), task.test_split) == (kind, columns, split)
    mine = validate(RunConfig, {"model": "tiny-bert", "task": {"dataset": dataset, "test_split": "test",
                                                               "text_column": "s"}}, "t").task
    assert (mine.test_split, mine.text_column, mine.kind) == ("test", "s", kind)  # what a config says wins
