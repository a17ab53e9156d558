"""Answer-quality metrics against hand-computed values."""

from __future__ import annotations

import pytest

from qlora_ray.metrics import Similarity, corpus_bleu, exact_match, normalize_answer, rouge_l, summarize, token_f1


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
    summary = summarize(["a b", "c"], ["a b", "d"], [0.9, 0.5], threshold=0.75)
    assert summary["count"] == 2 and summary["exact_match"] == 0.5 and summary["similarity_match_accuracy"] == 0.5
    assert summary["similarity"] == pytest.approx(0.7)
