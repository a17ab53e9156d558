"""Grounded answers: the stored answer to a known question, a polite decline for an unrelated one.

An adapter's Q&A set is the training split of the data it was trained on: the registry manifest names the
file and its fingerprint, and the split is redone from the data settings saved beside the adapter, so no
holdout question is in it. A manifest may point only at data under the registry or the run storage, unless it
records the file's fingerprint (then anywhere, as long as the file matches it). Its questions are embedded
with all-MiniLM-L6-v2 (:class:`qlora_ray.metrics.Similarity`) once per dataset and split (:class:`QASets`,
keyed by :func:`dataset_key`: adapters trained on the same data share one set). For each request
(``serve.grounding``):

- the nearest stored question scores below ``domain_threshold``: the reply is ``decline_message`` (not for
  a request that brings a passage, as context-QA and alpaca requests may: that passage is the topic);
- a stored question with the same context (and the same leading tag, when the request has one) scores at or
  above ``exact_threshold``: the reply is its stored answer (the first in file order among equals);
- otherwise the model answers.

Questions are compared without their leading ``<TAG>``: people type "What is Galaxy?", not
"<GALAXY>What is Galaxy?". A chat-format request is grounded only when it is one question (no earlier turns,
whose answer would depend on them), and only such single-question rows are stored. A stored answer or a
decline is cut to the request's ``max_tokens`` and ``stop`` as generated text would be (:func:`fit_answer`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.formats import format_named, leading_tag
from data.templates import question_of
from qlora_ray.config import GroundingConfig
from qlora_ray.errors import QloraRayError
from qlora_ray.storage import is_uri

STORED, MODEL, DECLINED = "stored", "model", "declined"
EMBED_BATCH = 256
RETRY_BUILD_S = 60.0  # a Q&A set that failed to build is answered with that failure this long, then tried again


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


def training_examples(
    directory: str | Path, manifest: dict[str, Any], trusted: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The examples an adapter was trained on: the training split of the dataset its manifest names.

    The file must be where training read it (a relative path is taken from this process's working directory)
    and unchanged since (its fingerprint must match the manifest's). A file outside the ``trusted`` locations
    (the registry and the run storage; URIs other than ``file://`` are skipped) is read only when the manifest
    records its fingerprint: a manifest cannot make the server read any file it likes.
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
    local = Path(path).exists()
    checked = bool(expected) and not expected.startswith("name:")  # a fingerprint of the file's bytes
    if local or not expected.startswith("name:"):  # a hub dataset is fingerprinted by its name, and read by it
        if not checked and not _inside(path, trusted):
            roots = ", ".join(str(r) for r in _roots(trusted)) or "none is local"
            raise GroundingError(
                f"its training data {path} (the manifest's dataset.path) is outside the registry and the run "
                f"storage ({roots}), and the manifest records no fingerprint to check that file against; register "
                "the adapter with its dataset's fingerprint (qlora-ray's sweep does), move the data under the "
                "registry, or turn serve.grounding off for it"
            )
        if not local:
            raise GroundingError(
                f"its training data {path} (the manifest's dataset.path) is not on this replica (working "
                f"directory {os.getcwd()}); make it available at that path, or turn serve.grounding off for it"
            )
        found = dataset_fingerprint(path)
        if checked and expected != found:
            raise GroundingError(
                f"its training data {path} changed since training (fingerprint {found}, manifest {expected}); "
                "restore that file, or turn serve.grounding off for this adapter"
            )
    loaded, train, _ = split_examples(data.model_copy(update={"path": path}))
    return [loaded.examples[i] for i in train]


def _roots(locations: Sequence[str]) -> list[Path]:
    """The local directories among ``locations`` (plain paths and ``file://`` URIs), resolved."""
    roots = []
    for location in locations:
        if location.startswith("file://"):
            location = location[len("file://") :]
        elif is_uri(location) or not location:
            continue
        roots.append(Path(location).expanduser().resolve())
    return roots


def _inside(path: str, locations: Sequence[str]) -> bool:
    resolved = Path(path).expanduser().resolve()  # links followed: a link inside pointing out is outside
    return any(resolved.is_relative_to(root) for root in _roots(locations))


def dataset_key(directory: str | Path, manifest: dict[str, Any]) -> tuple[str, ...]:
    """What an adapter's Q&A set depends on: its dataset (the file's path and the manifest's fingerprint of it)
    and the settings that read and split it. Adapters with equal keys share one set, and one failure: the path
    is in the key because a build fails by path (a file gone, or outside the trusted locations), so a copy of
    the same data elsewhere is not condemned with it."""
    from qlora_ray.registry import saved_data_config

    data = saved_data_config(directory)
    if data is None:  # no saved data settings: no Q&A set can be built, and this adapter's failure is its own
        return ("adapter", str(directory))
    dataset = manifest.get("dataset") or {}
    path, fingerprint = dataset.get("path") or data.path, dataset.get("fingerprint") or ""
    return (path, fingerprint, data.format, data.split, data.on_bad_rows, repr(data.holdout_fraction), str(data.seed))


def fit_answer(answer: str, max_tokens: int, stop: Sequence[str], tokenizer: Any) -> tuple[str, str, int]:
    """A stored answer or a decline as a request asked for it: ``(text, finish_reason, completion_tokens)``.

    As generated text ends: cut to its first ``max_tokens`` tokens (finish_reason ``length``), and within them
    before the first stop string (``stop``; the stop string is not returned). ``completion_tokens`` counts
    the tokens of the text returned.
    """
    fast = getattr(tokenizer, "is_fast", False)  # a fast tokenizer maps tokens to characters
    encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=fast)
    text, reason, tokens = answer, "stop", len(encoded["input_ids"])
    if tokens > max_tokens:
        tokens = max(max_tokens, 0)
        if fast:  # a prefix of the answer itself, not a re-decoding that might differ in spaces or characters
            text = answer[: encoded["offset_mapping"][tokens - 1][1]] if tokens else ""
        else:
            text = tokenizer.decode(encoded["input_ids"][:tokens], skip_special_tokens=True)
        reason = "length"
    cut = min((at for at in (text.find(s) for s in stop if s) if at >= 0), default=-1)
    if cut >= 0:
        text, reason = text[:cut], "stop"
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return text, reason, tokens


class QASets:
    """Q&A sets by :func:`dataset_key`, each built once: concurrent requests wait for the same build, and a
    build that failed is answered with its error for ``retry_s`` seconds before it is tried again.

    Used from one event loop; ``build`` runs the work elsewhere (the replica's grounding thread).
    """

    def __init__(self, retry_s: float = RETRY_BUILD_S, clock: Callable[[], float] = time.monotonic):
        self.retry_s, self.clock = retry_s, clock
        self.built: dict[Hashable, QASet] = {}
        self.building: dict[Hashable, asyncio.Future] = {}
        self.failed: dict[Hashable, tuple[float, Exception]] = {}  # key: (retry after, error)

    async def get(self, key: Hashable, build: Callable[[], Awaitable[QASet]]) -> QASet:
        """The set of ``key``; ``build()`` makes it if no set, build or recent failure for ``key`` exists."""
        if key in self.built:
            return self.built[key]
        if key in self.failed:
            retry_at, error = self.failed[key]
            if self.clock() < retry_at:
                raise error.with_traceback(None)
            del self.failed[key]
        if key not in self.building:
            task = asyncio.ensure_future(self._build(key, build))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # no "never retrieved"
            self.building[key] = task
        # shield: a request that goes away does not cancel the build the others wait for
        return await asyncio.shield(self.building[key])

    async def _build(self, key: Hashable, build: Callable[[], Awaitable[QASet]]) -> QASet:
        try:
            qa = await build()
        except Exception as err:
            self.failed[key] = (self.clock() + self.retry_s, err)
            raise
        finally:
            del self.building[key]
        self.built[key] = qa
        return qa

    def keep(self, keys: set[Hashable]) -> None:
        """Drop the built sets whose key is not in ``keys`` (no loaded adapter uses them any more)."""
        for key in [k for k in self.built if k not in keys]:
            del self.built[key]
