"""Sentence pairs and regression (GLUE's MRPC / RTE / QNLI / QQP and STS-B settings), and the metrics the field
reports for them: Matthews correlation, binary F1, Pearson and Spearman."""

import json
import math

import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from peftlab.errors import PeftlabError
from peftlab.models.load import load_tokenizer
from peftlab.specs import ModelSpec, PlanSpec, RunConfig, TaskSpec, TrainSpec
from peftlab.tasks.kinds import KINDS, task_kind
from peftlab.tasks.prepare import collate, load_task

pytestmark = pytest.mark.usefixtures("private_cache")

WORDS = ["good", "fine", "great", "bad", "poor", "awful"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(name="tiny-bert"))


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair_rows(n=80):
    """Two short sentences; label 1 where they share their adjective's polarity."""
    rows = []
    for i in range(n):
        a, b = WORDS[i % 6], WORDS[(i * 5 + 1) % 6]
        rows.append({"first": f"the soup was {a}", "second": f"the bread was {b}", "label": int((i % 6 < 3) == ((i * 5 + 1) % 6 < 3))})
    return rows


def score_rows(n=80):
    return [{"text": f"the meal was {WORDS[i % 6]} {'and ' + WORDS[(i + 2) % 6] if i % 2 else ''}",
             "score": round(5.0 - (i % 6) * 0.8 + 0.1 * (i % 3), 2)} for i in range(n)]


def test_a_sentence_pair_is_encoded_as_the_tokenizer_encodes_pairs(tmp_path, tokenizer):
    spec = TaskSpec(path=write(tmp_path / "pairs.jsonl", pair_rows()), kind="classification", text_column="first",
                    text_pair_column="second")
    data = load_task(spec, tokenizer)
    example = data.train[0]
    row = next(r for r in pair_rows() if tokenizer(r["first"], r["second"])["input_ids"] == example["input_ids"])
    expected = tokenizer(row["first"], row["second"])
    assert example["token_type_ids"] == expected["token_type_ids"] and example["input_ids"].count(tokenizer.sep_token_id) == 2
    batch = collate(data.train[:4], tokenizer.pad_token_id)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and int(batch["token_type_ids"].max()) == 1


def test_a_missing_pair_column_names_the_column(tmp_path, tokenizer):
    spec = TaskSpec(path=write(tmp_path / "pairs.jsonl", pair_rows()), kind="classification", text_column="first",
                    text_pair_column="third")
    with pytest.raises(PeftlabError, match="third"):
        load_task(spec, tokenizer)


def test_regression_labels_are_numbers_and_a_bad_one_names_its_row(tmp_path, tokenizer):
    rows = score_rows()
    data = load_task(TaskSpec(path=write(tmp_path / "scores.jsonl", rows), kind="regression", label_column="score"),
                     tokenizer)
    assert data.labels == [] and all(isinstance(e["labels"], float) for e in data.train)
    assert collate(data.train[:3], tokenizer.pad_token_id)["labels"].dtype.is_floating_point
    rows[7]["score"] = "high"
    with pytest.raises(PeftlabError, match=r"row 8: label 'high' is not a finite number"):
        load_task(TaskSpec(path=write(tmp_path / "bad.jsonl", rows), kind="regression", label_column="score"), tokenizer)


def test_the_scores_are_scipy_and_scikit_learn_s():
    predictions, golds = [1, 0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 0, 1, 1]
    scores = task_kind("classification").scores(0.5, predictions, golds, 2)
    assert scores["mcc"] == pytest.approx(matthews_corrcoef(golds, predictions))
    assert scores["f1"] == pytest.approx(f1_score(golds, predictions))
    assert "f1" not in task_kind("classification").scores(0.5, [0, 1, 2], [0, 2, 2], 3)  # binary only
    assert task_kind("classification").scores(0.5, [0, 0, 0], [0, 1, 0], 2)["mcc"] == 0.0  # one class predicted
    values, truth = [0.1, 0.4, 0.35, 0.8, 0.9], [0.0, 0.5, 0.3, 0.7, 1.0]
    regression = task_kind("regression").scores(0.1, values, truth, 0)
    assert regression["pearson"] == pytest.approx(pearsonr(values, truth).statistic)
    assert regression["spearman"] == pytest.approx(spearmanr(values, truth).statistic)
    constant = task_kind("regression").scores(0.1, [0.5] * 5, truth, 0)
    assert constant["pearson"] == 0.0 and constant["predicted_values"] == 1
    from peftlab.records.degenerate import degenerate_reason

    assert degenerate_reason({"metrics.test.predicted_values": 1}) == "predicts a single value"


def test_every_kind_declares_its_metrics():
    from peftlab import measures

    for kind in KINDS.values():
        assert all(measures.metric(name) is not None for name in (kind.primary, *kind.metrics)), kind.name
    assert KINDS["regression"].primary == "pearson" and measures.higher_is_better("metrics.test.spearman")


@pytest.mark.parametrize("kind, label", [("classification", "label"), ("regression", "score")])
def test_a_run_trains_pairs_and_regression_and_reports_their_metrics(tmp_path, kind, label):
    from conftest import run_to_dict

    rows = pair_rows() if kind == "classification" else [{**r, "second": "the service was quick"} for r in score_rows()]
    text = "first" if kind == "classification" else "text"
    config = RunConfig(model=ModelSpec(name="tiny-bert"),
                       task=TaskSpec(path=write(tmp_path / "data.jsonl", rows), kind=kind, text_column=text,
                                     text_pair_column="second", label_column=label, max_eval_examples=16),
                       plan=PlanSpec(allocation=2), train=TrainSpec(max_steps=4, batch_size=8, latency_batches=1))
    result = run_to_dict(config, tmp_path / "run")
    test = result["metrics"]["test"]
    assert result["status"] == "done" and result["data"]["kind"] == kind
    if kind == "classification":
        assert {"accuracy", "mcc", "f1"} <= set(test)
        assert result["speed"]["prefix_cache"] is None or not result["speed"]["prefix_cache"].get("used")
    else:
        assert {"pearson", "spearman", "loss"} <= set(test) and "accuracy" not in test
        assert -1 <= test["pearson"] <= 1 or math.isnan(test["pearson"])


def test_the_sparsity_profile_knows_a_regression_model_by_its_one_output():
    from peftlab.models.load import load_model
    from peftlab.tasks.kinds import kind_for_model

    one = load_model(ModelSpec(name="tiny-bert", head="sequence-classification").model_copy(update={"num_labels": 1}))
    two = load_model(ModelSpec(name="tiny-bert", head="sequence-classification", num_labels=2))
    assert kind_for_model(one).name == "regression" and kind_for_model(two).name == "classification"
