"""The GLUE benchmark's tasks as the papers report them: each task's columns, kind, the split scored (GLUE's
test labels are hidden, so published fine-tuning numbers are on the dev split) and its metrics, the first being
the one a study of it is judged by (CoLA: Matthews correlation; STS-B: Pearson; MRPC and QQP: F1, then
accuracy; the rest: accuracy). The GLUE table of docs/tutorials/published-results.md is this one (a test compares
them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GLUE_IDS = ("glue", "nyu-mll/glue")  # the dataset's Hub ids


@dataclass(frozen=True)
class GlueTask:
    name: str  # the dataset's configuration
    kind: str  # a key of `tasks.kinds.KINDS`
    text: str
    pair: str | None
    metrics: tuple[str, ...]  # as reported, the first judged by
    test_split: str = "validation"

    def task(self, path: str = "glue", **settings: Any) -> dict[str, Any]:
        """A `task:` mapping that trains on it (`settings`: further task fields, e.g. max_length)."""
        return {"dataset": f"{path}:{self.name}", **self.defaults(), **settings}

    def defaults(self) -> dict[str, Any]:
        """The task fields a `task.dataset` naming it implies: its kind, columns and the splits scored."""
        pair = {"text_pair_column": self.pair} if self.pair else {}
        return {"kind": self.kind, "text_column": self.text, **pair, "train_split": "train",
                "test_split": self.test_split}


GLUE: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "classification", "sentence", None, ("mcc",)),
    GlueTask("sst2", "classification", "sentence", None, ("accuracy",)),
    GlueTask("mrpc", "classification", "sentence1", "sentence2", ("f1", "accuracy")),
    GlueTask("qqp", "classification", "question1", "question2", ("f1", "accuracy")),
    GlueTask("stsb", "regression", "sentence1", "sentence2", ("pearson", "spearman")),
    GlueTask("mnli", "classification", "premise", "hypothesis", ("accuracy",), test_split="validation_matched"),
    GlueTask("qnli", "classification", "question", "sentence", ("accuracy",)),
    GlueTask("rte", "classification", "sentence1", "sentence2", ("accuracy",)),
    GlueTask("wnli", "classification", "sentence1", "sentence2", ("accuracy",)),
)}


def glue_task(task: dict[str, Any] | None) -> GlueTask | None:
    """The GLUE task a dumped `task:` reads, if it reads one."""
    dataset = (task or {}).get("dataset")
    if isinstance(dataset, str):
        path, _, name = dataset.rpartition(":")
    elif isinstance(dataset, dict):
        path, name = dataset.get("path"), dataset.get("name")
    else:
        return None
    return GLUE.get(name) if path in GLUE_IDS else None
