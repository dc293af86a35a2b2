"""A task's rows -> validated, split, tokenized examples (cached on disk) and padded batches."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftlab.errors import PeftlabError
from peftlab.files import write_atomic
from peftlab.models.load import cache_dir
from peftlab.tasks.bundled import BUNDLED
from peftlab.tasks.chat import (
    CHAT_COLUMNS,
    chat_column,
    check_template,
    encode_chat,
    turns,
)
from peftlab.tasks.data import load_hf_dataset, read_records, read_text, require_columns

if TYPE_CHECKING:
    from peftlab.specs import TaskSpec

IGNORE = -100  # label of positions that carry no loss (prompt, padding)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
FORMATS = {  # instruction, input, response columns
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
}


@dataclass
class TaskData:
    kind: str  # "classification" or "instruction"
    labels: list[str]  # class names (classification)
    train: list[dict[str, Any]]  # each {"input_ids": [...], "labels": int | [...]}
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    dropped: int = 0  # examples with no supervised token: an empty response, or nothing left after truncation
    cache_file: Path | None = field(default=None, repr=False)


@dataclass
class _Rows:
    rows: list[dict[str, Any]]
    source: str
    row_offset: int  # number of the first data row, as a person counts them in the file


def load_task(spec: TaskSpec, tokenizer: Any) -> TaskData:
    kind, train, test = _raw(spec)
    columns = _columns(spec, kind, train)
    for part in (train, test):
        if part is not None:
            require_columns(part.rows, columns, part.source, part.row_offset,
                            may_be_empty=columns[1:] if kind == "instruction" else ())
    train_rows, validation_rows, test_rows = _split(spec, train, test)
    labels = _labels(spec, kind, train_rows, test_rows, train, test or train)
    key = _cache_key(spec, kind, tokenizer, labels, train_rows, validation_rows, test_rows)
    cache_file = cache_dir() / "tokenized" / f"{key}.json"
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        return TaskData(kind, labels, cached["train"], cached["validation"], cached["test"], cached["dropped"], cache_file)
    encode = _encoder(spec, kind, tokenizer, labels, columns)
    splits, dropped = {}, 0
    for name, rows in (("train", train_rows), ("validation", validation_rows), ("test", test_rows)):
        source = (test or train).source if name == "test" else train.source
        encoded = [encode(row, f"{source}: row {i}") for i, row in rows]
        splits[name] = [e for e in encoded if e is not None]
        dropped += len(encoded) - len(splits[name])
    if not splits["train"]:
        raise PeftlabError(f"{train.source}: no training example has a supervised token left at max_length={spec.max_length}")
    write_atomic(cache_file, json.dumps({**splits, "dropped": dropped}))
    return TaskData(kind, labels, splits["train"], splits["validation"], splits["test"], dropped, cache_file)


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
    train = _Rows(load_hf_dataset(spec.dataset, spec.train_split), f"{spec.dataset}[{spec.train_split}]", 0)
    test = _Rows(load_hf_dataset(spec.dataset, spec.test_split), f"{spec.dataset}[{spec.test_split}]", 0) if spec.test_split else None
    return spec.kind, train, test


def _columns(spec: TaskSpec, kind: str, train: _Rows) -> tuple[str, ...]:
    if kind == "classification":
        return (spec.text_column, spec.label_column)
    fmt = spec.format
    first = train.rows[0]
    if fmt == "chat" or (fmt == "auto" and chat_column(first)):
        return (chat_column(first) or "messages",)
    if fmt == "auto":
        fmt = "dolly" if "response" in first and "output" not in first else "alpaca"
    instruction, context, response = FORMATS[fmt]
    return (instruction, response, context) if all(context in r for r in train.rows[:1]) else (instruction, response)


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


def _labels(spec: TaskSpec, kind: str, train_rows, test_rows, train_source: _Rows, test_source: _Rows) -> list[str]:
    if kind != "classification":
        return []
    seen = sorted({str(row[spec.label_column]) for _, row in train_rows})
    labels = [str(x) for x in spec.labels] if spec.labels else seen
    unknown = [(i, str(row[spec.label_column])) for i, row in train_rows if str(row[spec.label_column]) not in labels]
    if unknown:
        raise PeftlabError(f"{train_source.source}: row {unknown[0][0]}: label {unknown[0][1]!r} is not in task.labels {labels}")
    for i, row in test_rows:
        if str(row[spec.label_column]) not in seen:
            raise PeftlabError(
                f"{test_source.source}: row {i}: test label {row[spec.label_column]!r} never occurs in training "
                f"(training labels: {', '.join(seen)})"
            )
    if len(labels) < 2:
        raise PeftlabError(f"task: classification needs at least 2 labels, the training data has {labels}")
    return labels


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
        "version": 2,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:24]


def render_prompt(template: str, instruction: str, context: str) -> str:
    context = context.strip()
    return template.format(
        instruction=instruction.strip(),
        input=context,
        with_input=", paired with an input that provides further context" if context else "",
        input_block=f"### Input:\n{context}\n\n" if context else "",
    )


def _encoder(spec: TaskSpec, kind: str, tokenizer: Any, labels: list[str], columns: tuple[str, ...]):
    if kind == "classification":
        index = {name: i for i, name in enumerate(labels)}

        def encode_classification(row, where):
            ids = tokenizer(str(row[spec.text_column]), truncation=True, max_length=spec.max_length)["input_ids"]
            return {"input_ids": ids, "labels": index[str(row[spec.label_column])]}

        return encode_classification

    if columns[0] in CHAT_COLUMNS:
        check_template(tokenizer, spec.chat_template, getattr(tokenizer, "name_or_path", "the model"))

        def encode_conversation(row, where):
            conversation = turns(row[columns[0]], f"{where}: {columns[0]}")
            return encode_chat(conversation, tokenizer, spec.chat_template, spec.max_length, where, IGNORE)

        return encode_conversation

    instruction_col, response_col = columns[0], columns[1]
    context_col = columns[2] if len(columns) > 2 else None
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    template = spec.template or ALPACA_TEMPLATE

    def encode_instruction(row, where):
        if not str(row[response_col]).strip():
            return None  # an empty response teaches nothing but an immediate stop: dropped and counted
        prompt = render_prompt(template, str(row[instruction_col]), str(row.get(context_col) or "") if context_col else "")
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(str(row[response_col]), add_special_tokens=False)["input_ids"] + [eos]
        response_ids = response_ids[: spec.max_length // 2]
        room = spec.max_length - len(response_ids)
        if len(prompt_ids) > room:
            # keep the prompt's start and its end (the `### Response:` marker); drop its middle
            tail = min(16, room // 2)
            prompt_ids = prompt_ids[: room - tail] + prompt_ids[len(prompt_ids) - tail :]
        if not response_ids or not prompt_ids:  # the first token is never predicted: it needs a prompt before it
            return None
        return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE] * len(prompt_ids) + response_ids}

    return encode_instruction


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of the batch."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    token_labels = isinstance(examples[0]["labels"], list)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long) if token_labels else None
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        attention_mask[i, :n] = 1
        if token_labels:
            labels[i, :n] = torch.tensor(e["labels"])
    if not token_labels:
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_indexed(index: list[int], examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate` of the examples at `index`, which the batch carries along as `index`."""
    return {**collate([examples[i] for i in index], pad_id), "index": torch.tensor(index, dtype=torch.long)}


def text_chunks(path: Path, text_column: str, tokenizer: Any, max_length: int, max_tokens: int) -> list[dict[str, Any]]:
    """A general text as examples of `max_length` tokens whose every token after the first is predicted (the
    forgetting probe): a .txt file whole, or the `text_column` of CSV / JSON / JSONL rows joined by blank lines."""
    if path.suffix.lower() == ".txt":
        text = read_text(path)
    else:
        rows = read_records(path)
        require_columns(rows, (text_column,), str(path), 2 if path.suffix.lower() == ".csv" else 1)
        text = "\n\n".join(str(row[text_column]) for row in rows)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    size = max_length - len(start)
    chunks = [start + ids[i : i + size] for i in range(0, len(ids), size)]
    examples = [{"input_ids": c, "labels": [IGNORE] * len(start) + c[len(start):]} for c in chunks if len(c) > len(start) + 1]
    if not examples:
        raise PeftlabError(f"{path}: eval.forgetting needs at least two tokens of text")
    return examples
