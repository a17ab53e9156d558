"""Grounded answers: the stored answer to a known question, a polite decline for an unrelated one.

An adapter's Q&A set is the training split of the data it was trained on: the registry manifest names the
file and its fingerprint, and the split is redone from the data settings saved beside the adapter, so no
holdout question is in it. Its questions are embedded with all-MiniLM-L6-v2 (:class:`qlora_ray.metrics.Similarity`)
once, when a replica loads the adapter. For each request (``serve.grounding``):

- the nearest stored question scores below ``domain_threshold``: the reply is ``decline_message`` (not for
  a request that brings a passage, as context-QA and alpaca requests may: that passage is the topic);
- a stored question with the same context (and the same leading tag, when the request has one) scores at or
  above ``exact_threshold``: the reply is its stored answer (the first in file order among equals);
- otherwise the model answers.

Questions are compared without their leading ``<TAG>``: people type "What is Galaxy?", not
"<GALAXY>What is Galaxy?". A chat-format request is grounded only when it is one question (no earlier turns,
whose answer would depend on them), and only such single-question rows are stored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.formats import format_named, leading_tag
from data.templates import question_of
from qlora_ray.config import GroundingConfig
from qlora_ray.errors import QloraRayError

STORED, MODEL, DECLINED = "stored", "model", "declined"
EMBED_BATCH = 256


class GroundingError(QloraRayError, RuntimeError):
    """An adapter's Q&A set cannot be built; the message says what is missing and what to do."""


@dataclass(frozen=True)
class Verdict:
    """Which path answers a question: ``source`` is stored, model or declined; ``answer`` is None for model."""

    source: str
    score: float  # cosine similarity of the nearest stored question
    answer: str | None = None
    nearest: str | None = None


def _key(example: dict[str, Any]) -> tuple[str, str | None, str] | None:
    """(context, leading tag in upper case, question without the tag) of an example or a request; None for one
    that is not a single question (a chat turn that follows others)."""
    if not format_named(example["format"]).asks_one_question(example):
        return None
    context, question = question_of(example)
    question = question.strip()
    tag = leading_tag(question)
    if tag:
        question = question[len(tag) :].strip()
    return context.strip(), tag.upper() if tag else None, question


class QASet:
    """Questions and answers, with the questions' embeddings."""

    def __init__(self, examples: list[dict[str, Any]], embedder: Any):
        import torch

        rows = [(_key(ex), ex["completion"]) for ex in examples]
        rows = [(key, answer) for key, answer in rows if key is not None and key[2]]
        self.embedder = embedder
        self.scopes = [(key[0], key[1]) for key, _ in rows]  # (context, tag)
        self.questions = [key[2] for key, _ in rows]
        self.answers = [answer for _, answer in rows]
        batches = [embedder.embed(self.questions[i : i + EMBED_BATCH]) for i in range(0, len(rows), EMBED_BATCH)]
        self.vectors = torch.cat(batches) if batches else torch.zeros(0)

    def __len__(self) -> int:
        return len(self.questions)

    def decide(self, example: dict[str, Any], settings: GroundingConfig) -> Verdict:
        """The path that answers ``example`` (a request in the adapter's format) under ``settings``."""
        import torch

        key = _key(example)
        if not self.questions or key is None or not key[2]:
            return Verdict(MODEL, float("nan"))
        context, tag, question = key
        scores = self.vectors @ self.embedder.embed([question])[0]
        best = int(scores.argmax())
        top = float(scores[best])
        if top < settings.domain_threshold and not context:
            return Verdict(DECLINED, top, settings.decline_message, self.questions[best])
        same = torch.tensor([c == context and tag in (None, t) for c, t in self.scopes])
        if bool(same.any()):
            match = int(torch.where(same, scores, torch.full_like(scores, -2.0)).argmax())
            if float(scores[match]) >= settings.exact_threshold:
                return Verdict(STORED, float(scores[match]), self.answers[match], self.questions[match])
        return Verdict(MODEL, top, None, self.questions[best])


def training_examples(directory: str | Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The examples an adapter was trained on: the training split of the dataset its manifest names.

    The file must be where training read it (a relative path is taken from this process's working directory)
    and unchanged since (its fingerprint must match the manifest's).
    """
    from data.dataset import split_examples
    from qlora_ray.registry import ADAPTER_CONFIG, dataset_fingerprint, saved_data_config

    data = saved_data_config(directory)
    if data is None:
        raise GroundingError(f"{directory} has no {ADAPTER_CONFIG}, so its training data is unknown; "
                             "turn serve.grounding off for it, or serve an adapter trained by qlora-ray")  # fmt: skip
    dataset = manifest.get("dataset") or {}
    path = dataset.get("path") or data.path
    expected = dataset.get("fingerprint") or ""
    if not expected.startswith("name:"):  # a hub dataset is fingerprinted by its name, and read by it
        if not Path(path).exists():
            raise GroundingError(
                f"its training data {path} (the manifest's dataset.path) is not on this replica (working "
                f"directory {os.getcwd()}); make it available at that path, or turn serve.grounding off for it"
            )
        found = dataset_fingerprint(path)
        if expected and expected != found:
            raise GroundingError(
                f"its training data {path} changed since training (fingerprint {found}, manifest {expected}); "
                "restore that file, or turn serve.grounding off for this adapter"
            )
    loaded, train, _ = split_examples(data.model_copy(update={"path": path}))
    return [loaded.examples[i] for i in train]
