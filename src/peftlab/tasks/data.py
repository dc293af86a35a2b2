"""Reading task data from CSV / JSON / JSONL / `datasets`, with errors that name the file and row."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError


def read_text(path: Path) -> str:
    """A UTF-8 file's text (a byte-order mark dropped); errors name the file and the line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PeftlabError(f"{path}: no such file") from None
    except OSError as exc:
        raise PeftlabError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PeftlabError(f"{path}: line {line}: invalid UTF-8 (byte offset {exc.start})") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV, JSON (a list of objects) or JSONL file."""
    text = read_text(path)
    if not text.strip():
        raise PeftlabError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    elif suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append(_json_row(path, line, number))
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
    if not rows:
        raise PeftlabError(f"{path}: no rows")
    return rows


def _json_row(path: Path, line: str, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PeftlabError(f"{path}: line {number}: invalid JSON: {exc.msg}") from None
    if not isinstance(row, dict):
        raise PeftlabError(f"{path}: line {number}: expected a JSON object")
    return row


def load_hf_dataset(name: str, split: str) -> list[dict[str, Any]]:
    """Rows of a `datasets` dataset (a hub id or a local path; offline when cached)."""
    import datasets

    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as exc:  # datasets raises many types; the user needs the message
        raise PeftlabError(f"dataset {name!r} split {split!r}: cannot load: {str(exc).splitlines()[0]}") from None


def require_columns(rows: list[dict[str, Any]], columns: tuple[str, ...], source: str, row_offset: int = 1,
                    may_be_empty: tuple[str, ...] = ()) -> None:
    """Every row has every column, with a non-empty value unless the column is in `may_be_empty`;
    else an error naming the row."""
    for i, row in enumerate(rows):
        for column in columns:
            value = row.get(column)
            if value is None or (isinstance(value, str) and not value.strip() and column not in may_be_empty):
                present = ", ".join(sorted(k for k, v in row.items() if k is not None and v is not None)) or "none"
                what = "missing" if value is None else "empty"
                raise PeftlabError(
                    f"{source}: row {i + row_offset}: column {column!r} is {what} (columns present: {present})"
                )
