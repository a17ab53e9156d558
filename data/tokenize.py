"""Tokenisation with label masking, the over-length policy, and batching without pad-to-max.

A tokenised row is ``{"input_ids": [...], "labels": [...]}``: the prompt tokens, then the completion
tokens and one EOS. Labels are -100 on the prompt (unless ``train_on_prompt``) and equal the ids on the
completion and its EOS, so the model learns to stop. Padding is added per batch by :func:`collate`, and
pad positions are masked by position, never by token id: a pad token equal to EOS keeps its EOS labels.

Prompt and completion are tokenised separately and concatenated, which is exactly what the model sees
when it generates after the same prompt.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from data.formats.registry import format_named
from data.templates import build_prompt
from qlora_ray.errors import QloraRayError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizeSettings:
    """What tokenisation needs from the config (``data.*`` and ``train.max_seq_len``)."""

    template: str
    max_seq_len: int
    train_on_prompt: bool = False
    overlength: str = "truncate"  # truncate | skip | error

    @classmethod
    def from_config(cls, cfg: Any) -> TokenizeSettings:
        return cls(cfg.data.template, cfg.train.max_seq_len, cfg.data.train_on_prompt, cfg.data.overlength)


@dataclass
class TokenizeReport:
    """Counts of what the over-length policy did, with the first few row locations of each."""

    rows: int = 0
    truncated: int = 0
    skipped: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, outcome: str, where: str) -> None:
        """Count one row whose outcome is ok, truncated or skipped."""
        self.rows += 1
        if outcome == "ok":
            return
        setattr(self, outcome, getattr(self, outcome) + 1)
        listed = self.examples.setdefault(outcome, [])
        if len(listed) < 5:
            listed.append(where)


class OverlengthError(QloraRayError, ValueError):
    """A row longer than ``train.max_seq_len`` under ``data.overlength: error``."""


def tokenize_examples(
    examples: list[dict[str, Any]], tokenizer: Any, settings: TokenizeSettings
) -> tuple[list[dict[str, Any] | None], TokenizeReport]:
    """Tokenise examples; the result is aligned with ``examples``, None where the policy skipped a row."""
    report = TokenizeReport()
    rows = []
    for example in examples:
        row, outcome = tokenize_example(example, tokenizer, settings)
        report.add(outcome, example["where"])
        rows.append(row)
    return rows, report


def tokenize_example(
    example: dict[str, Any], tokenizer: Any, settings: TokenizeSettings
) -> tuple[dict[str, Any] | None, str]:
    """Tokenise one example. Returns ``(row or None, outcome)``, outcome in ok | truncated | skipped."""
    completion = [*_encode(tokenizer, example["completion"], special=False), tokenizer.eos_token_id]
    prompt_text = build_prompt(example, settings.template, tokenizer)
    prompt = encode_prompt(tokenizer, prompt_text)
    budget = settings.max_seq_len - len(completion)
    outcome = "ok"
    if len(prompt) > budget:
        if settings.overlength == "error":
            raise OverlengthError(
                f"{example['where']}: {len(prompt) + len(completion)} tokens > train.max_seq_len "
                f"{settings.max_seq_len}; raise train.max_seq_len or set data.overlength: truncate or skip"
            )
        if settings.overlength == "skip":
            return None, "skipped"
        prompt = _truncate_prompt(example, tokenizer, settings, prompt, budget)
        if prompt is None:
            return None, "skipped"
        outcome = "truncated"
    labels = (prompt if settings.train_on_prompt else [IGNORE_INDEX] * len(prompt)) + completion
    return {"input_ids": prompt + completion, "labels": labels}, outcome


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt as training saw it (serving and evaluation encode prompts here too)."""
    # A chat template already writes BOS into the text; do not add a second one.
    bos = tokenizer.bos_token
    return _encode(tokenizer, text, special=not (bos and text.startswith(bos)))


def _truncate_prompt(
    example: dict[str, Any], tokenizer: Any, settings: TokenizeSettings, prompt: list[int], budget: int
) -> list[int] | None:
    """Fit the prompt into ``budget`` tokens the example's format's way, or None when it cannot be done.

    Most formats keep the end of the prompt; context QA keeps a window of the context around the answer
    (:meth:`data.formats.base.Format.shorten_prompt`).
    """
    if budget < 1:
        return None  # the completion alone does not fit

    def render(shortened: dict[str, Any]) -> list[int]:
        return encode_prompt(tokenizer, build_prompt(shortened, settings.template, tokenizer))

    return format_named(example["format"]).shorten_prompt(example, prompt, budget, tokenizer, render)


# --- batching ------------------------------------------------------------------------------------------


def collate(rows: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Pad a batch to its own longest row. Pad positions get attention 0 and label -100."""
    import torch

    longest = max(len(r["input_ids"]) for r in rows)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batch_order(lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True) -> list[list[int]]:
    """Row indices in batches, shuffled by ``seed``.

    With ``group_by_length`` rows are sorted by length inside shuffled windows of 64 batches, so a batch
    holds rows of similar length (little padding) while the order stays random from batch to batch.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * 64
        order = [
            i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lengths.__getitem__)
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def length_stats(lengths: list[int]) -> dict[str, int]:
    """Percentiles of token lengths (nearest rank)."""
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": ordered[-1]}


def useful_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of padded token positions that hold a real token under this batching."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return sum(lengths) / padded if padded else 0.0


def tag_counts(examples: list[dict[str, Any]]) -> Counter:
    return Counter(e["tag"] or "(none)" for e in examples)
