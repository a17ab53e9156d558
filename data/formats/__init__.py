"""Data formats: read a dataset and turn every row into one normalised example, or a bad-row report.

Lives here: :func:`load_examples` (read, detect or look up the format, normalise every row), and the
modules it builds on, each with one job:

- ``base``: the :class:`Format` interface, the example dict (:data:`EXAMPLE_KEYS`) and shared row helpers;
- ``registry``: :data:`FORMATS`, the one table of formats (its order is the detection order);
- ``reading``: JSON / JSONL / CSV / Parquet / ``datasets`` directory / hub reading and SQuAD flattening;
- one module per format: ``prompt_completion`` (``{"prompt", "completion"}``), ``context_qa`` (SQuAD and
  flat squad rows), ``chat`` (``{"messages": [...]}`` ending in the assistant's answer) and ``alpaca``
  (``{"instruction", "input", "output"}``).

``data.format`` names a format of the table, or ``auto`` to detect it from the first readable row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data.formats.base import (
    EXAMPLE_KEYS,
    BadRow,
    DataError,
    Format,
    RowProblem,
    leading_tag,
    new_example,
)
from data.formats.reading import read_rows
from data.formats.registry import AUTO, FORMATS, detect_format, format_named

__all__ = [
    "AUTO",
    "EXAMPLE_KEYS",
    "FORMATS",
    "MAX_LISTED_BAD_ROWS",
    "BadRow",
    "DataError",
    "Format",
    "LoadedData",
    "RowProblem",
    "describe_bad_rows",
    "format_named",
    "leading_tag",
    "load_examples",
    "new_example",
]

MAX_LISTED_BAD_ROWS = 20


@dataclass
class LoadedData:
    """Examples of one dataset, its format and the rows that could not be used."""

    source: str
    format: str
    examples: list[dict[str, Any]]
    bad_rows: list[BadRow] = field(default_factory=list)


def load_examples(path: str, fmt: str = AUTO, split: str = "train", on_bad_rows: str = "error") -> LoadedData:
    """Read ``path`` and normalise every row.

    Args:
        path: file, ``datasets`` directory or hub dataset name.
        fmt: a name in :data:`FORMATS`, or ``"auto"`` to detect it from the first readable row.
        split: split of a ``datasets`` directory or hub dataset.
        on_bad_rows: ``"error"`` raises :class:`DataError` listing bad rows; ``"skip"`` keeps them in the report.
    """
    rows = list(read_rows(path, split))
    form = _detect(path, rows) if fmt == AUTO else format_named(fmt)
    examples: list[dict[str, Any]] = []
    bad: list[BadRow] = []
    for where, row in rows:
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        try:
            if not isinstance(row, dict):
                raise RowProblem(f"a row must be an object, got {type(row).__name__}")
            examples.append(form.normalise(row, where))
        except RowProblem as problem:
            bad.append(BadRow(where, str(problem)))
    if bad and on_bad_rows == "error":
        raise DataError(
            describe_bad_rows(bad)
            + "\nFix these rows, or set data.on_bad_rows: skip to train without them (they stay counted)."
        )
    if not examples:
        raise DataError(f"{path}: no usable rows (format {form.name}); check data.path and data.format")
    return LoadedData(source=path, format=form.name, examples=examples, bad_rows=bad)


def describe_bad_rows(bad: list[BadRow]) -> str:
    """One line per bad row, the first :data:`MAX_LISTED_BAD_ROWS`, then how many more."""
    lines = [f"{len(bad)} bad row(s):"] + [f"  {b.where}: {b.reason}" for b in bad[:MAX_LISTED_BAD_ROWS]]
    if len(bad) > MAX_LISTED_BAD_ROWS:
        lines.append(f"  ... and {len(bad) - MAX_LISTED_BAD_ROWS} more")
    return "\n".join(lines)


def _detect(path: str, rows: list[tuple[str, Any]]) -> Format:
    """The format of the first row that is an object (later rows are checked by normalising them)."""
    for _, row in rows:
        if not isinstance(row, dict):
            continue
        found = detect_format(set(row))
        if found is None:
            expected = [fmt.fields for fmt in FORMATS.values()]
            raise DataError(
                f"{path}: cannot tell the format from the fields {sorted(row)}; expected "
                f"{', '.join(expected[:-1])}, or {expected[-1]}. Set data.format explicitly."
            )
        return found
    raise DataError(f"{path}: no readable rows to detect the format from")
