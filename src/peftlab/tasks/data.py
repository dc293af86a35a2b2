"""Reading task data from CSV / JSON / JSONL / `datasets`, with errors that name the file and row."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import PeftlabError, warn
from peftlab.files import require_file

if TYPE_CHECKING:
    from peftlab.specs import DatasetSpec


def read_text(path: Path) -> str:
    """A UTF-8 file's text (a byte-order mark dropped); errors name the file and the line. Only a regular
    file is opened (see `require_file`)."""
    require_file(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PeftlabError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PeftlabError(f"{path}: line {line}: invalid UTF-8 (byte offset {exc.start})") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV, JSON (a list of objects) or JSONL file. NUL bytes and other control characters in
    text values are removed, with a warning that counts them."""
    text = read_text(path)
    if not text.strip():
        raise PeftlabError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            rows = _csv_rows(path, text)
        elif suffix == ".jsonl":
            rows = [_json_row(path, line, number) for number, line in enumerate(text.splitlines(), start=1)
                    if line.strip()]
        elif suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PeftlabError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
            rows = data if isinstance(data, list) else None
            if rows is None or not all(isinstance(r, dict) for r in rows):
                raise PeftlabError(f"{path}: expected a JSON list of objects")
        else:
            raise PeftlabError(f"{path}: unsupported file type {suffix!r}; use .csv, .json or .jsonl")
    except RecursionError:
        raise PeftlabError(f"{path}: nested too deeply to be rows of data") from None
    if not rows:
        raise PeftlabError(f"{path}: no rows")
    return _without_control_characters(rows, path)


def _csv_rows(path: Path, text: str) -> list[dict[str, Any]]:
    """A CSV's rows as header -> value. A row with more or fewer fields than the header is refused (a
    misplaced comma or quote shifts every column after it); fields may be as long as the file."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        duplicates = sorted({name for name in header if header.count(name) > 1 and name})
        if duplicates:
            raise PeftlabError(f"{path}: line 1: column {duplicates[0]!r} appears twice in the header")
        rows = []
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue  # a blank line
            if len(fields) != len(header):
                raise PeftlabError(f"{path}: line {reader.line_num}: {len(fields)} fields, the header has "
                                   f"{len(header)} ({', '.join(header)}); quote fields that hold commas")
            rows.append(dict(zip(header, fields)))
        return rows
    except csv.Error as exc:
        raise PeftlabError(f"{path}: line {reader.line_num}: malformed CSV: {exc}") from None
    finally:
        csv.field_size_limit(limit)


# C0 control characters and DEL, except tab, newline and carriage return: never meant in a text field
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # half of a UTF-16 pair, as JSON's \ud800 escape: not a character


def _without_control_characters(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    removed, first = 0, None

    def clean(value: Any) -> Any:
        nonlocal removed
        if isinstance(value, str):
            if (surrogate := _SURROGATE.search(value)) is not None:
                raise PeftlabError(f"{path}: data row {number}: the text holds {surrogate.group()!a}, half of a "
                                   "UTF-16 surrogate pair and not a character; fix the escape")
            cleaned, n = _CONTROL.subn("", value)
            removed += n
            return cleaned
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    out = []
    for number, row in enumerate(rows, start=1):
        before = removed
        out.append(clean(row))
        if first is None and removed > before:
            first = number
    if removed:
        warn(f"{path}: removed {removed} NUL or control character(s) from text values (first in data row {first})")
    return out


def _json_row(path: Path, line: str, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PeftlabError(f"{path}: line {number}: invalid JSON: {exc.msg}") from None
    if not isinstance(row, dict):
        raise PeftlabError(f"{path}: line {number}: expected a JSON object")
    return row


def load_hf_dataset(dataset: DatasetSpec, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a `datasets` dataset (a Hub id, a local directory or a data file; offline when cached), the first
    `limit` of them streamed where a limit is given, with `dataset.columns` renamed to the task's names."""
    import datasets

    where = f"dataset {dataset.label!r} split {split!r}"
    try:
        loaded = datasets.load_dataset(dataset.path, dataset.name, split=split, revision=dataset.revision,
                                       streaming=limit is not None)
        rows = list(itertools.islice(loaded, limit)) if limit is not None else list(loaded)
    except Exception as exc:  # datasets raises many types; the user needs the message
        raise PeftlabError(f"{where}: cannot load: {str(exc).splitlines()[0]}") from None
    return rename_columns(rows, dataset.columns, where)


def rename_columns(rows: list[dict[str, Any]], columns: dict[str, str], where: str) -> list[dict[str, Any]]:
    """Each row with the task's column names (`columns`: task name -> the data's), or an error naming a column
    the data does not have."""
    if not columns or not rows:
        return rows
    missing = sorted(source for source in columns.values() if source not in rows[0])
    if missing:
        raise PeftlabError(f"{where}: dataset.columns names {', '.join(map(repr, missing))}, which the data does not "
                           f"have (its columns: {', '.join(sorted(map(str, rows[0])))})")
    return [{**row, **{task: row.get(source) for task, source in columns.items()}} for row in rows]


def require_columns(rows: list[dict[str, Any]], columns: tuple[str, ...], source: str, row_offset: int = 1,
                    may_be_empty: tuple[str, ...] = (), text: tuple[str, ...] = ()) -> None:
    """Every row has every column, with a non-empty value unless the column is in `may_be_empty`, and text
    (or a number) in the columns of `text`; else an error naming the row."""
    for i, row in enumerate(rows):
        for column in columns:
            value = row.get(column)
            if column in text and isinstance(value, (list, dict, bool)):
                raise PeftlabError(f"{source}: row {i + row_offset}: column {column!r} is a "
                                   f"{type(value).__name__} ({json.dumps(value)[:60]}); expected text")
            if value is None or (isinstance(value, str) and not value.strip() and column not in may_be_empty):
                present = ", ".join(sorted(k for k, v in row.items() if k is not None and v is not None)) or "none"
                what = "missing" if value is None else "empty"
                raise PeftlabError(
                    f"{source}: row {i + row_offset}: column {column!r} is {what} (columns present: {present})"
                )
