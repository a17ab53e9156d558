"""Deterministic train/holdout split, stratified by tag, with duplicate prompts kept on one side."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from typing import Any


def prompt_key(example: dict[str, Any]) -> str:
    """What makes two rows 'the same question': equal keys never straddle the split."""
    fields = (example["prompt"], example["context"], example["question"], example["messages"])
    return json.dumps(fields, ensure_ascii=False, sort_keys=True).casefold()


def holdout_split(examples: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split example indices into (train, holdout).

    Within each tag (rows without a tag form one stratum), groups of rows that share a prompt are shuffled
    with ``seed`` and moved to the holdout until it holds ``round(fraction * rows of that tag)`` rows.
    The result depends only on the examples, the fraction and the seed.
    """
    strata: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, example in enumerate(examples):
        strata[example["tag"] or ""][prompt_key(example)].append(index)
    holdout: list[int] = []
    for tag in sorted(strata):
        groups = sorted(strata[tag].values())
        random.Random(f"{seed}:{tag}").shuffle(groups)
        target = round(fraction * sum(len(g) for g in groups))
        taken = 0
        for group in groups:
            if taken >= target:
                break
            holdout.extend(group)
            taken += len(group)
    held = set(holdout)
    return [i for i in range(len(examples)) if i not in held], sorted(held)
