"""Answer-quality metrics against hand-computed values."""

from __future__ import annotations

import dataclasses

import pytest

from jobs import evaluate
from qlora_ray import metrics
from qlora_ray.card import with_evaluation
from qlora_ray.config import ConfigError, from_dict
from qlora_ray.metrics import Similarity, corpus_bleu, exact_match, normalize_answer, rouge_l, summarize, token_f1
from tune import report, sweep


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the cat sat.", "Cat sat") == 1.0 and exact_match("a dog", "cat") == 0.0
    # prediction "cat sat down" vs reference "the cat sat": 2 common of 3 and 2 -> P 2/3, R 1
    assert token_f1("cat sat down", "the cat sat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("dog", "cat") == 0.0


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # LCS of "a b c d" and "a c d e" is "a c d" (3): P 3/4, R 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("same words", "same words") == 1.0 and rouge_l("x y", "z") == 0.0


def test_bleu_is_100_for_identical_text_and_lower_otherwise():
    refs = ["ray serve deploys the adapter as an endpoint", "the sweep picks the best adapter by loss"]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert 0 < corpus_bleu(["ray serve deploys an endpoint", "the sweep picks the adapter"], refs) < 100


def test_semantic_similarity_ranks_paraphrases_above_unrelated_text():
    similarity = Similarity()
    same, paraphrase, unrelated = similarity.scores(
        ["How do I reset my password?"] * 3,
        ["How do I reset my password?", "What are the steps to change my password?", "Bananas are yellow fruit."],
    )
    assert same == pytest.approx(1.0, abs=1e-4) and unrelated < 0.3 < paraphrase < same


def test_summary_counts_matches_at_the_threshold():
    summary = summarize(["a b", "c"], ["a b", "d"], [0.9, 0.5])
    assert summary["count"] == 2 and summary["exact_match"] == 0.5 and summary["similarity_match_accuracy"] == 0.5
    assert summary["similarity"] == pytest.approx(0.7)
    # The threshold lives with its metric; a similarity exactly at it is a match, one just below is not.
    assert metrics.SIMILARITY_THRESHOLD == 0.75
    assert summarize(["x", "y"], ["x", "y"], [0.75, 0.7499])["similarity_match_accuracy"] == 0.5


def test_summary_keys_are_count_and_the_tables_names_as_eval_json_had_them():
    summary = summarize(["ray serve", "tune"], ["ray serve", "train"], [1.0, 0.2])
    assert list(summary) == ["count", *metrics.names()]
    assert metrics.names() == (
        "exact_match", "token_f1", "rouge_l", "bleu", "similarity", "similarity_match_accuracy",
    )  # fmt: skip  (eval.json, registry manifests and configs name these keys)
    assert summary["bleu"] == pytest.approx(corpus_bleu(["ray serve", "tune"], ["ray serve", "train"]))
    assert summarize([], [], []) == {"count": 0} | dict.fromkeys(metrics.names(), 0.0)


def test_the_table_has_unique_names_and_by_name_lists_them_when_wrong():
    assert len(set(metrics.names())) == len(metrics.METRICS)
    assert metrics.by_name("bleu").label == "BLEU" and metrics.by_name("bleu").fmt == ".2f"  # 0-100, not 0-1
    with pytest.raises(KeyError, match="token_f1"):
        metrics.by_name("f1")


# A metric where less is better, added to the table by tests: how many words an answer has.
WORDS = metrics.Metric("answer_words", "answer words", False, metrics.mean_of(lambda p, r: len(p.split())), ".1f")


@pytest.fixture
def with_words(monkeypatch):
    """The table with :data:`WORDS` appended, for this test only (monkeypatch puts the table back)."""
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, WORDS))


class FixedSimilarity:
    """Stands in for the embedding model: every answer is 0.8 similar to its reference."""

    def scores(self, predictions: list[str], references: list[str]) -> list[float]:
        return [0.8] * len(predictions)


def _evaluated(monkeypatch) -> dict:
    """A report from ``jobs.evaluate.score`` over two tagged rows, with the embedding model stood in for."""
    monkeypatch.setattr(metrics, "Similarity", FixedSimilarity)
    examples = [
        {"format": "prompt_completion", "prompt": "Who serves?", "completion": "Ray Serve does", "tag": "<RAY>"},
        {"format": "prompt_completion", "prompt": "Who tunes?", "completion": "Ray Tune", "tag": "<RAY>"},
    ]
    answers = {0: ("nobody at all", "Ray Serve does"), 1: ("Ray", "Ray Tune")}
    return evaluate.score(examples, answers, {"base": 4.0, "tuned": 3.0})


def test_every_metric_of_the_table_reaches_evaluation_and_the_card(monkeypatch):
    report_ = _evaluated(monkeypatch)
    overall = report_["groups"]["overall"]
    assert report_["similarity_threshold"] == metrics.SIMILARITY_THRESHOLD
    text, card = evaluate.table(report_), with_evaluation("", report_)
    for m in metrics.METRICS:
        assert m.name in report_["groups"]["<RAY>"]["tuned"]
        assert f"overall        {m.name:<26} {overall['base'][m.name]:>9{m.fmt}}" in text
        assert f"| {m.label} | {overall['base'][m.name]:{m.fmt}} | {overall['tuned'][m.name]:{m.fmt}} |" in card
    assert f"| token F1 | {overall['base']['token_f1']:.4f} | {overall['tuned']['token_f1']:.4f} |" in card


def test_a_metric_added_to_the_table_is_computed_shown_and_rankable(monkeypatch, with_words):
    assert summarize(["a b c", "d"], ["a", "d"], [0.1, 0.2])["answer_words"] == 2.0
    report_ = _evaluated(monkeypatch)
    overall = report_["groups"]["overall"]
    assert (overall["base"]["answer_words"], overall["tuned"]["answer_words"]) == (2.0, 2.5)
    assert "| answer words | 2.0 | 2.5 |" in with_evaluation("", report_)
    assert "overall        answer_words                     2.0       2.5" in evaluate.table(report_)
    assert from_dict({"sweep": {"rank_by": "answer_words"}}).sweep.rank_by == "answer_words"
    monkeypatch.undo()  # the table as it ships: the metric is gone from the config's choices again
    with pytest.raises(ConfigError, match=r"sweep\.rank_by"):
        from_dict({"sweep": {"rank_by": "answer_words"}})


def test_direction_decides_better_and_best():
    f1 = metrics.by_name("token_f1")
    assert f1.better(0.6, 0.5) and not f1.better(0.5, 0.6) and not f1.better(0.5, 0.5)
    assert WORDS.better(3, 9) and not WORDS.better(9, 3) and not WORDS.better(3, 3)
    scores = {"terse": 2.0, "wordy": 9.0}
    assert f1.best(scores, key=scores.get) == "wordy" and WORDS.best(scores, key=scores.get) == "terse"


def test_the_sweep_ranks_trials_by_their_answers_in_the_metrics_direction(monkeypatch, tmp_path, with_words):
    # Trial "a" answers in four words and "b" in one: a higher-is-better metric and a lower-is-better one disagree.
    said = {"a": "serve deploys the adapter", "b": "serve"}
    for trial in said:
        (tmp_path / trial / "adapter").mkdir(parents=True)
    monkeypatch.setattr(metrics, "Similarity", FixedSimilarity)
    monkeypatch.setattr(evaluate, "holdout_prompts", lambda cfg, check: [{"i": 0, "prompt": "q", "reference": "x"}])
    monkeypatch.setattr(evaluate, "generate_answers",
                        lambda cfg, directory, rows, with_base: {0: (None, said[directory.split("/")[-2]])})  # fmt: skip

    def winner(rank_by: str) -> str:
        cfg = from_dict({"sweep": {"rank_by": rank_by, "rank_top_k": 2}})
        trials = [report.TrialRecord(t, 8, 16.0, 1e-4, 0.0, "finished", best=1.0, checkpoint=str(tmp_path / t))
                  for t in said]  # fmt: skip
        return sweep.rank_by_answers(cfg, None, trials, str(tmp_path)).trial_id

    assert winner("answer_words") == "b"
    more_is_better = dataclasses.replace(WORDS, higher_is_better=True)
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS[:-1], more_is_better))
    assert winner("answer_words") == "a"
