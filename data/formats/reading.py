"""Reading dataset files into raw rows, each with where it came from, before any format is applied.

Supported: JSON (an array of rows, or SQuAD's ``{"data": ...}``, flattened to one row per question), JSONL,
CSV, Parquet, a local Hugging Face ``datasets`` directory, or a hub dataset name (only where the hub is
reachable). A line that cannot be parsed is yielded as a :class:`BadRow`, so every bad row is reported at once;
a file that cannot be read at all raises :class:`DataError`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.formats.base import BadRow, DataError, indexed_items


def read_rows(path: str, split: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of ``path``; ``row`` is a :class:`BadRow` for one that could not be parsed.

    Args:
        path: file, ``datasets`` directory or hub dataset name.
        split: split of a ``datasets`` directory or hub dataset.
    """
    p = Path(path)
    if p.is_dir():
        yield from _read_datasets_dir(p, split)
    elif p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from _read_jsonl(p)
        elif suffix == ".json":
            yield from _read_json(p)
        elif suffix == ".csv":
            yield from _read_csv(p)
        elif suffix == ".parquet":
            yield from _read_parquet(p)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .csv or .parquet")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith("."):
        yield from _read_hub(path, split)
    else:
        raise DataError(f"{path}: no such file or directory; check data.path (relative paths start at the cwd)")


def _read_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    with p.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{p}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, BadRow(where, f"not UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, BadRow(where, f"not valid JSON ({err.msg} at column {err.colno})")


def _read_json(p: Path) -> Iterator[tuple[str, Any]]:
    try:
        document = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 ({err.reason} at byte {err.start}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"{p}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); for one object per line name the file .jsonl"
        ) from None
    if isinstance(document, dict) and "data" in document:
        yield from _squad_rows(document["data"], str(p))
    elif isinstance(document, list):
        for number, row in enumerate(document, start=1):
            yield f"{p} row {number}", row
    else:
        raise DataError(f"{p}: expected a JSON array of rows or a SQuAD object with a 'data' key")


def _read_csv(p: Path) -> Iterator[tuple[str, Any]]:
    try:
        with p.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                yield f"{p}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 ({err.reason}); re-encode the file as UTF-8") from None
    except csv.Error as err:
        raise DataError(f"{p}: not valid CSV ({err})") from None


def _read_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{p}: not a readable Parquet file ({err})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{p} row {number}", row


def _read_datasets_dir(p: Path, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as err:
        raise DataError(f"{p}: not a `datasets` directory saved with save_to_disk ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{p}: no split {split!r}; set data.split to one of {sorted(loaded)}")
        loaded = loaded[split]
    for number, row in enumerate(loaded, start=1):
        yield f"{p} row {number}", row


def _read_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(
            f"{name}: not a local path, and loading it from the dataset hub failed ({type(err).__name__}: {err}). "
            "Without hub access, download the data elsewhere and point data.path at the file."
        ) from None
    for number, row in enumerate(loaded, start=1):
        yield f"{name}[{split}] row {number}", row


def _squad_rows(data: Any, source: str) -> Iterator[tuple[str, Any]]:
    """One row per SQuAD question, carrying its paragraph's context, located by its path in the document."""
    for a, article in indexed_items(data):
        for p, paragraph in indexed_items(article.get("paragraphs") if isinstance(article, dict) else None):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            for q, qa in indexed_items(paragraph.get("qas") if isinstance(paragraph, dict) else None):
                where = f"{source} data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict):
                    yield where, BadRow(where, "a question entry must be an object")
                    continue
                yield where, {"context": context, **qa}
