"""The model card's evaluation section, from an eval.json report."""

from __future__ import annotations

from jobs.card import EVALUATION_HEADING, with_evaluation

SIDE = {"count": 3, "exact_match": 0.0, "token_f1": 0.25, "rouge_l": 0.2, "bleu": 3.5, "similarity": 0.5,
        "similarity_match_accuracy": 1 / 3}  # fmt: skip


def _report(f1: float) -> dict:
    tuned = {**SIDE, "token_f1": f1, "holdout_loss": 3.8, "holdout_perplexity": 44.7}
    base = {**SIDE, "holdout_loss": 4.67, "holdout_perplexity": 106.7}
    return {"similarity_threshold": 0.75, "generation": {"max_tokens": 48},
            "groups": {"overall": {"base": base, "tuned": tuned}, "<RAY>": {"base": SIDE, "tuned": SIDE}}}  # fmt: skip


def test_the_evaluation_section_goes_before_use_and_is_replaced_not_repeated():
    card = "---\nbase_model: x\n---\n\n# run\n\ntext\n\n## Use\n\n```python\ncode\n```\n"
    first = with_evaluation(card, _report(0.5))
    assert first.index(EVALUATION_HEADING) < first.index("## Use") and "| token F1 | 0.2500 | 0.5000 |" in first
    assert "| holdout loss | 4.6700 | 3.8000 |" in first and "| <RAY> | 3 | 0.250 -> 0.250 |" in first
    second = with_evaluation(first, _report(0.75))
    assert second.count(EVALUATION_HEADING) == 1 and "| token F1 | 0.2500 | 0.7500 |" in second
    assert "0.5000 |" not in second.split("## Use")[0].split("token F1")[1].splitlines()[0]
    assert second.endswith("```python\ncode\n```\n")  # the rest of the card is kept as it was
    assert with_evaluation("", _report(0.5)).startswith(EVALUATION_HEADING)
