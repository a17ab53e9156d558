"""Read a dataset file and turn every row into one normalised example, or a bad-row report.

Supported files: JSON (an array of rows, or SQuAD's ``{"data": ...}``), JSONL, CSV, Parquet, a local
Hugging Face ``datasets`` directory, or a hub dataset name (only where the hub is reachable).

Supported row formats (``data.format``, or detected from the first row):

- ``prompt_completion``: ``{"prompt", "completion"}``
- ``context_qa``: SQuAD, with lists or with objects keyed ``"0", "1", ...`` as the HEA seed has them, or flat
  rows ``{"context", "question", "answers"}`` as Hugging Face's squad has them
- ``chat``: ``{"messages": [{"role", "content"}, ...]}`` whose last message is the assistant's answer
- ``alpaca``: ``{"instruction", "input", "output"}``

An example is a plain dict (it crosses Ray process boundaries) with the keys of :data:`EXAMPLE_KEYS`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_ray.errors import QloraRayError

FORMATS = ("prompt_completion", "context_qa", "chat", "alpaca")
EXAMPLE_KEYS = (
    "where",
    "format",
    "tag",
    "prompt",
    "completion",
    "context",
    "question",
    "answer_start",
    "messages",
)
MAX_LISTED_BAD_ROWS = 20
_TAG = re.compile(r"^\s*<([A-Za-z][A-Za-z0-9_-]*)>")
_ROLES = {"system", "user", "assistant"}


class DataError(QloraRayError, ValueError):
    """A dataset that cannot be used as it is; the message names the file, rows and fix."""


@dataclass
class BadRow:
    where: str
    reason: str


@dataclass
class LoadedData:
    """Examples of one dataset, its format and the rows that could not be used."""

    source: str
    format: str
    examples: list[dict[str, Any]]
    bad_rows: list[BadRow] = field(default_factory=list)


def load_examples(path: str, fmt: str = "auto", split: str = "train", on_bad_rows: str = "error") -> LoadedData:
    """Read ``path`` and normalise every row.

    Args:
        path: file, ``datasets`` directory or hub dataset name.
        fmt: one of :data:`FORMATS` or ``"auto"``.
        split: split of a ``datasets`` directory or hub dataset.
        on_bad_rows: ``"error"`` raises :class:`DataError` listing bad rows; ``"skip"`` keeps them in the report.
    """
    rows = list(_read_rows(path, split))
    if fmt == "auto":
        fmt = _detect_format(path, rows)
    examples: list[dict[str, Any]] = []
    bad: list[BadRow] = []
    for where, row in rows:
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        try:
            examples.extend(_normalise(row, fmt, where))
        except _RowProblem as problem:
            bad.append(BadRow(where, str(problem)))
    if bad and on_bad_rows == "error":
        raise DataError(
            describe_bad_rows(bad)
            + "\nFix these rows, or set data.on_bad_rows: skip to train without them (they stay counted)."
        )
    if not examples:
        raise DataError(f"{path}: no usable rows (format {fmt}); check data.path and data.format")
    return LoadedData(source=path, format=fmt, examples=examples, bad_rows=bad)


def describe_bad_rows(bad: list[BadRow]) -> str:
    """One line per bad row, the first :data:`MAX_LISTED_BAD_ROWS`, then how many more."""
    lines = [f"{len(bad)} bad row(s):"] + [f"  {b.where}: {b.reason}" for b in bad[:MAX_LISTED_BAD_ROWS]]
    if len(bad) > MAX_LISTED_BAD_ROWS:
        lines.append(f"  ... and {len(bad) - MAX_LISTED_BAD_ROWS} more")
    return "\n".join(lines)


def leading_tag(text: str) -> str | None:
    """The ``<TAG>`` a prompt starts with (kept as plain text in the prompt), or None."""
    match = _TAG.match(text)
    return f"<{match.group(1)}>" if match else None


# --- reading -------------------------------------------------------------------------------------------


def _read_rows(path: str, split: str) -> Iterator[tuple[str, Any]]:
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


def _items(value: Any) -> list[tuple[str, Any]]:
    """Index/value pairs of a SQuAD list, or of the HEA seed's objects keyed "0", "1", ..."""
    if isinstance(value, list):
        return [(str(i), v) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return list(value.items())
    return []


def _squad_rows(data: Any, source: str) -> Iterator[tuple[str, Any]]:
    for a, article in _items(data):
        for p, paragraph in _items(article.get("paragraphs") if isinstance(article, dict) else None):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            for q, qa in _items(paragraph.get("qas") if isinstance(paragraph, dict) else None):
                where = f"{source} data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict):
                    yield where, BadRow(where, "a question entry must be an object")
                    continue
                yield where, {"context": context, **qa}


# --- normalising ---------------------------------------------------------------------------------------


class _RowProblem(ValueError):
    pass


def _detect_format(path: str, rows: list[tuple[str, Any]]) -> str:
    for _, row in rows:
        if not isinstance(row, dict):
            continue
        keys = set(row)
        if "messages" in keys:
            return "chat"
        if {"instruction", "output"} <= keys:
            return "alpaca"
        if {"prompt", "completion"} <= keys:
            return "prompt_completion"
        if {"context", "question"} <= keys:
            return "context_qa"
        raise DataError(
            f"{path}: cannot tell the format from the fields {sorted(keys)}; expected prompt/completion, "
            "context/question/answers, messages, or instruction/input/output. Set data.format explicitly."
        )
    raise DataError(f"{path}: no readable rows to detect the format from")


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise _RowProblem(f"missing field {key!r}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise _RowProblem(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise _RowProblem(f"field {key!r} is empty")
    return value


def _example(where: str, fmt: str, completion: str, **fields: Any) -> dict[str, Any]:
    example = dict.fromkeys(EXAMPLE_KEYS)
    example.update(where=where, format=fmt, completion=completion, **fields)
    return example


def _normalise(row: Any, fmt: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(row, dict):
        raise _RowProblem(f"a row must be an object, got {type(row).__name__}")
    if fmt == "prompt_completion":
        prompt = _text(row, "prompt")
        return [_example(where, fmt, _text(row, "completion"), prompt=prompt, tag=leading_tag(prompt))]
    if fmt == "alpaca":
        instruction = _text(row, "instruction")
        fields = {"question": instruction, "context": _text(row, "input", required=False)}
        return [_example(where, fmt, _text(row, "output"), tag=leading_tag(instruction), **fields)]
    if fmt == "context_qa":
        return [_context_qa(row, where)]
    if fmt == "chat":
        return [_chat(row, where)]
    raise DataError(f"unknown data.format {fmt!r}; use one of {', '.join(FORMATS)} or auto")


def _context_qa(row: dict[str, Any], where: str) -> dict[str, Any]:
    context, question = _text(row, "context"), _text(row, "question")
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        text, start = answers, None
    elif isinstance(answers, dict) and isinstance(answers.get("text"), list):  # Hugging Face squad columns
        starts = answers.get("answer_start") or [None]
        text, start = (answers["text"] or [None])[0], starts[0]
    else:
        first = next(iter(_items(answers)), (None, None))[1]
        if not isinstance(first, dict):
            raise _RowProblem("missing answer: expected 'answers' with at least one {text, answer_start}")
        text, start = first.get("text"), first.get("answer_start")
    if not isinstance(text, str) or not text.strip():
        raise _RowProblem("the answer text is empty or not a string")
    if start is not None and not isinstance(start, int):
        raise _RowProblem(f"answer_start must be an integer, got {type(start).__name__}")
    return _example(where, "context_qa", text, context=context, question=question, answer_start=start)


def _chat(row: dict[str, Any], where: str) -> dict[str, Any]:
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise _RowProblem("'messages' must be a list of at least a user and an assistant message")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _RowProblem(f"messages[{i}] needs a role among {sorted(_ROLES)}")
        clean.append({"role": message["role"], "content": _text(message, "content")})
    if clean[-1]["role"] != "assistant":
        raise _RowProblem("the last message must be the assistant's answer")
    first_user = next((m["content"] for m in clean if m["role"] == "user"), "")
    return _example(where, "chat", clean[-1]["content"], messages=clean[:-1], tag=leading_tag(first_user))
