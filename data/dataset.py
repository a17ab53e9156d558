"""From ``data.*`` settings to tokenised train and holdout rows: read, split, tokenise.

Small datasets are tokenised in-process (starting Ray Data costs seconds); from ``data.ray_data_min_rows``
rows on, tokenisation runs as a Ray Data ``map_batches`` over the cluster with the same function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from data.formats import LoadedData, load_examples
from data.splits import holdout_split
from data.tokenize import TokenizeReport, TokenizeSettings, tokenize_example, tokenize_examples


@dataclass
class PreparedData:
    """Everything a run needs from its dataset, with the counts a person should see."""

    loaded: LoadedData
    train_examples: list[dict[str, Any]]
    holdout_examples: list[dict[str, Any]]
    train_rows: list[dict[str, Any]]
    holdout_rows: list[dict[str, Any]]
    report: TokenizeReport


def prepare(data_cfg: Any, tokenizer: Any, settings: TokenizeSettings) -> PreparedData:
    """Read ``data_cfg.path``, split it, and tokenise both splits.

    Args:
        data_cfg: the ``data`` section of the config.
        tokenizer: the base model's tokenizer (with its pad token set).
        settings: tokenisation settings (template, max length, masking, over-length policy).
    """
    loaded, train_idx, holdout_idx = split_examples(data_cfg)
    tokenize = tokenize_with_ray_data if len(loaded.examples) >= data_cfg.ray_data_min_rows else tokenize_examples
    rows, report = tokenize(loaded.examples, tokenizer, settings)
    return PreparedData(
        loaded=loaded,
        train_examples=[loaded.examples[i] for i in train_idx],
        holdout_examples=[loaded.examples[i] for i in holdout_idx],
        train_rows=[rows[i] for i in train_idx if rows[i] is not None],
        holdout_rows=[rows[i] for i in holdout_idx if rows[i] is not None],
        report=report,
    )


def split_examples(data_cfg: Any) -> tuple[LoadedData, list[int], list[int]]:
    """Read ``data_cfg.path`` and split its examples: (loaded, train indices, holdout indices)."""
    loaded = load_examples(data_cfg.path, data_cfg.format, data_cfg.split, data_cfg.on_bad_rows)
    train_idx, holdout_idx = holdout_split(loaded.examples, data_cfg.holdout_fraction, data_cfg.seed)
    return loaded, train_idx, holdout_idx


class _TokenizeBatch:
    """Ray Data callable: one tokenizer per actor, the same :func:`tokenize_example` per row."""

    def __init__(self, tokenizer: Any, settings: TokenizeSettings):
        self.tokenizer, self.settings = tokenizer, settings

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "outcome": [], "where": []}
        for encoded in batch["example"]:
            example = json.loads(encoded)
            row, outcome = tokenize_example(example, self.tokenizer, self.settings)
            out["input_ids"].append(row["input_ids"] if row else [])
            out["labels"].append(row["labels"] if row else [])
            out["outcome"].append(outcome)
            out["where"].append(example["where"])
        return out


def tokenize_with_ray_data(
    examples: list[dict[str, Any]], tokenizer: Any, settings: TokenizeSettings
) -> tuple[list[dict[str, Any] | None], TokenizeReport]:
    """:func:`tokenize_examples` on the Ray cluster (started locally if none is running), order kept."""
    import ray

    if not examples:
        return [], TokenizeReport()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # Examples travel as JSON strings: their optional fields would otherwise need an Arrow schema.
    dataset = ray.data.from_items([{"example": json.dumps(e, ensure_ascii=False)} for e in examples])
    tokenized = dataset.map_batches(
        _TokenizeBatch, fn_constructor_args=(tokenizer, settings), batch_size=256, concurrency=(1, 4)
    )
    report = TokenizeReport()
    rows: list[dict[str, Any] | None] = []
    for record in tokenized.iter_rows():
        report.add(record["outcome"], record["where"])
        keep = record["outcome"] != "skipped"
        rows.append({"input_ids": list(record["input_ids"]), "labels": list(record["labels"])} if keep else None)
    return rows, report
