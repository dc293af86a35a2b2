"""A task's rows -> validated, split, tokenized examples (cached on disk) and padded batches."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftlab.errors import PeftlabError, warn
from peftlab.files import write_atomic
from peftlab.models.load import cache_dir
from peftlab.tasks.bundled import BUNDLED
from peftlab.tasks.chat import CHAT_COLUMNS, check_template, end_of_turn
from peftlab.tasks.data import load_hf_dataset, read_records, read_text, require_columns
from peftlab.tasks.fit import IGNORE
from peftlab.tasks.kinds import ALPACA_TEMPLATE, task_kind

if TYPE_CHECKING:
    from peftlab.specs import TaskSpec


@dataclass
class TaskData:
    kind: str  # a key of `tasks.kinds.KINDS`
    labels: list[str]  # class names (classification)
    train: list[dict[str, Any]]  # each {"input_ids": [...], "labels": int | [...]}
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    dropped: int = 0  # examples with no supervised token: an empty response, or nothing left after truncation
    truncated: int = 0  # examples longer than task.max_length, cut to it
    end_of_turn: str | None = None  # a chat template's end-of-turn text when it is not one special token
    cache_file: Path | None = field(default=None, repr=False)


@dataclass
class _Rows:
    rows: list[dict[str, Any]]
    source: str
    row_offset: int  # number of the first data row, as a person counts them in the file


def load_task(spec: TaskSpec, tokenizer: Any, drawn: int | None = None) -> TaskData:
    """`drawn`: the most training examples the run can use (a run of `max_steps`); only the first `drawn` of
    the split's training rows are tokenized. The class names still come from every training row."""
    kind, train, test = _raw(spec)
    handler = task_kind(kind)
    columns = handler.columns(spec, train.rows)
    for part in (train, test):
        if part is not None:
            require_columns(part.rows, columns, part.source, part.row_offset,
                            may_be_empty=handler.optional_columns(columns),
                            text=tuple(c for c in columns if c not in CHAT_COLUMNS and c != spec.label_column))
    train_rows, validation_rows, test_rows = _split(spec, train, test)
    held_out = [(validation_rows, train.source), (test_rows, (test or train).source)]
    labels = handler.labels(spec, train_rows, held_out, train.source)
    train_rows = train_rows[:drawn] if drawn else train_rows
    key = _cache_key(spec, kind, tokenizer, labels, train_rows, validation_rows, test_rows)
    ender = None
    if columns[0] in CHAT_COLUMNS:  # the template is checked before any row is encoded
        probe = check_template(tokenizer, spec.chat_template, getattr(tokenizer, "name_or_path", "the model"))
        ender = end_of_turn(tokenizer, probe)
    cache_file = cache_dir() / "tokenized" / f"{key}.json"
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached["truncated"]:
            _warn_truncated(spec, train, cached["truncated"])
        return TaskData(kind, labels, cached["train"], cached["validation"], cached["test"], cached["dropped"],
                        cached["truncated"], ender, cache_file)
    truncated: list[str] = []  # where examples were cut to max_length
    encode = handler.encoder(spec, tokenizer, labels, columns, truncated)
    splits, dropped = {}, 0
    for name, rows in (("train", train_rows), ("validation", validation_rows), ("test", test_rows)):
        source = (test or train).source if name == "test" else train.source
        encoded = [encode(row, f"{source}: row {i}") for i, row in rows]
        splits[name] = [e for e in encoded if e is not None]
        dropped += len(encoded) - len(splits[name])
    if not splits["train"]:
        raise PeftlabError(f"{train.source}: no training example has a supervised token left at max_length={spec.max_length}")
    if truncated:
        _warn_truncated(spec, train, len(truncated), truncated[0])
    write_atomic(cache_file, json.dumps({**splits, "dropped": dropped, "truncated": len(truncated)}))
    return TaskData(kind, labels, splits["train"], splits["validation"], splits["test"], dropped, len(truncated),
                    ender, cache_file)


def _warn_truncated(spec: TaskSpec, train: _Rows, count: int, first: str | None = None) -> None:
    where = f" (first: {first.rsplit(': ', 1)[-1]})" if first else ""
    warn(f"{train.source}: {count} example(s) longer than task.max_length={spec.max_length} tokens were "
         f"truncated{where}")


def _raw(spec: TaskSpec) -> tuple[str, _Rows, _Rows | None]:
    if spec.name is not None:
        kind, loader = BUNDLED[spec.name]
        return kind, _Rows(loader("train"), spec.name, 1), _Rows(loader("test"), f"{spec.name} (test)", 1)
    if spec.path is not None:
        offset = 2 if spec.path.suffix.lower() == ".csv" else 1  # a CSV's first line is its header
        train = _Rows(read_records(spec.path), str(spec.path), offset)
        test = None
        if spec.test_path is not None:
            test = _Rows(read_records(spec.test_path), str(spec.test_path), 2 if spec.test_path.suffix.lower() == ".csv" else 1)
        return spec.kind, train, test
    dataset = spec.dataset
    train = _Rows(load_hf_dataset(dataset, spec.train_split), f"{dataset.label}[{spec.train_split}]", 0)
    test = None
    if spec.test_split:  # its first max_eval_examples rows are all a run reads of it: streamed
        rows = load_hf_dataset(dataset, spec.test_split, spec.max_eval_examples)
        test = _Rows(rows, f"{dataset.label}[{spec.test_split}]", 0)
    return spec.kind, train, test


def _split(spec: TaskSpec, train: _Rows, test: _Rows | None):
    """Deterministic by `split_seed`: the same data split for every training seed."""
    indexed = list(enumerate(train.rows, start=train.row_offset))
    random.Random(spec.split_seed).shuffle(indexed)
    if test is None:
        n_test = max(1, round(spec.test_fraction * len(indexed)))
        test_rows, indexed = indexed[:n_test], indexed[n_test:]
    else:
        test_rows = list(enumerate(test.rows, start=test.row_offset))
    n_val = round(spec.validation_fraction * len(indexed))
    validation_rows, train_rows = indexed[:n_val], indexed[n_val:]
    if spec.max_train_examples:
        train_rows = train_rows[: spec.max_train_examples]
    if spec.max_eval_examples:
        validation_rows = validation_rows[: spec.max_eval_examples]
        test_rows = test_rows[: spec.max_eval_examples]
    if not train_rows:
        raise PeftlabError(f"{train.source}: no training rows left after the validation/test split")
    return train_rows, validation_rows, test_rows


def _fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:{tokenizer.eos_token_id}:{digest}"


def _cache_key(spec: TaskSpec, kind: str, tokenizer: Any, labels: list[str], *splits) -> str:
    content = {
        "tokenizer": _fingerprint(tokenizer),
        "data": [[row for _, row in rows] for rows in splits],
        "kind": kind,
        "template": spec.template or ALPACA_TEMPLATE,
        "max_length": spec.max_length,
        "labels": labels,
        "columns": [spec.text_column, spec.label_column, spec.format],
        "chat_template": spec.chat_template or getattr(tokenizer, "chat_template", None),
        "version": 5,  # 4: examples cut only beyond max_length, from the prompt's start; 5: a prompt and its
        # answer tokenized as one text
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:24]


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of the batch."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    token_labels = isinstance(examples[0]["labels"], list)
    segments = torch.zeros((len(examples), longest), dtype=torch.long) if "token_type_ids" in examples[0] else None
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long) if token_labels else None
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        attention_mask[i, :n] = 1
        if segments is not None:
            segments[i, :n] = torch.tensor(e["token_type_ids"])
        if token_labels:
            labels[i, :n] = torch.tensor(e["labels"])
    if not token_labels:  # a class index, or a regression's number
        dtype = torch.float32 if isinstance(examples[0]["labels"], float) else torch.long
        labels = torch.tensor([e["labels"] for e in examples], dtype=dtype)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {**batch, "token_type_ids": segments} if segments is not None else batch


def collate_indexed(index: list[int], examples: list[dict[str, Any]], pad_id: int,
                    packed: bool = False) -> dict[str, torch.Tensor]:
    """`collate` (or with `packed`, `collate_packed`) of the examples at `index`, which the batch carries along as
    `index`."""
    chosen = [examples[i] for i in index]
    batch = collate_packed(chosen) if packed else collate(chosen, pad_id)
    return {**batch, "index": torch.tensor(index, dtype=torch.long)}


def collate_packed(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Token-labelled examples concatenated into one row without padding: `position_ids` restart at 0 with every
    example (transformers confines attention to each example from them, given no attention mask), and no token
    is predicted across a boundary (the first label of each example is ignored). `attention_mask` is all ones:
    it counts the row's tokens, and the model is called without it (`models.load.backbone_hidden`)."""
    input_ids, labels, positions = [], [], []
    for e in examples:
        input_ids += e["input_ids"]
        labels += [IGNORE] + list(e["labels"][1:])
        positions += range(len(e["input_ids"]))
    row = torch.tensor([input_ids], dtype=torch.long)
    return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long)}


def general_text(path: Path, text_column: str) -> str:
    """The forgetting probe's general text: a .txt file whole, or the `text_column` of CSV / JSON / JSONL rows
    joined by blank lines. Read (and so checked) before the task's data is tokenized."""
    if path.suffix.lower() == ".txt":
        text = read_text(path)
    else:
        rows = read_records(path)
        require_columns(rows, (text_column,), str(path), 2 if path.suffix.lower() == ".csv" else 1, text=(text_column,))
        text = "\n\n".join(str(row[text_column]) for row in rows)
    if not text.strip():
        raise PeftlabError(f"{path}: eval.forgetting needs text; the file has none")
    return text


def text_chunks(text: str, source: Path, tokenizer: Any, max_length: int, max_tokens: int) -> list[dict[str, Any]]:
    """`text` (see `general_text`) as examples of `max_length` tokens whose every token after the first is
    predicted (the forgetting probe)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    size = max_length - len(start)
    chunks = [start + ids[i : i + size] for i in range(0, len(ids), size)]
    examples = [{"input_ids": c, "labels": [IGNORE] * len(start) + c[len(start):]} for c in chunks if len(c) > len(start) + 1]
    if not examples:
        raise PeftlabError(f"{source}: eval.forgetting needs at least two tokens of text")
    return examples
