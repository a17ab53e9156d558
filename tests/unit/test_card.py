"""The model card's evaluation section, from an eval.json report."""

from __future__ import annotations

from qlora_ray.card import EVALUATION_HEADING, USAGE_HEADING, model_card, with_evaluation
from qlora_ray.config import Config

SIDE = {"count": 3, "exact_match": 0.0, "token_f1": 0.25, "rouge_l": 0.2, "bleu": 3.5, "similarity": 0.5,
        "similarity_match_accuracy": 1 / 3}  # fmt: skip


def _report(f1: float) -> dict:
    tuned = {**SIDE, "token_f1": f1, "holdout_loss": 3.8, "holdout_perplexity": 44.7}
    base = {**SIDE, "holdout_loss": 4.67, "holdout_perplexity": 106.7}
    return {"similarity_threshold": 0.75, "generation": {"max_tokens": 48},
            "groups": {"overall": {"base": base, "tuned": tuned}, "<RAY>": {"base": SIDE, "tuned": SIDE}}}  # fmt: skip


def test_the_evaluation_section_goes_before_use_and_is_replaced_not_repeated():
    card = f"---\nbase_model: x\n---\n\n# run\n\ntext\n\n{USAGE_HEADING}\n\n```python\ncode\n```\n"
    first = with_evaluation(card, _report(0.5))
    assert first.index(EVALUATION_HEADING) < first.index(USAGE_HEADING) and "| token F1 | 0.2500 | 0.5000 |" in first
    assert "| holdout loss | 4.6700 | 3.8000 |" in first and "| `<RAY>` | 3 | 0.250 -> 0.250 |" in first
    assert "| BLEU | 3.50 | 3.50 |" in first and "| tag | rows | token F1 | similarity (all-MiniLM-L6-v2) |" in first
    second = with_evaluation(first, _report(0.75))
    assert second.count(EVALUATION_HEADING) == 1 and "| token F1 | 0.2500 | 0.7500 |" in second
    assert "0.5000 |" not in second.split(USAGE_HEADING)[0].split("token F1")[1].splitlines()[0]
    assert second.endswith("```python\ncode\n```\n")  # the rest of the card is kept as it was
    assert with_evaluation("", _report(0.5)).startswith(EVALUATION_HEADING)


def test_the_model_card_holds_the_run_numbers_and_replaces_its_not_evaluated_note():
    cfg = Config.model_validate({"run": {"name": "faq"}, "data": {"path": "data/faq.jsonl"}, "lora": {"r": 4}})
    metrics = {"val_loss": 3.21, "val_perplexity": 24.8, "step": 32, "epoch": 2.0, "train_seconds": 150.0,
               "hardware": "Test CPU, 2 threads"}  # fmt: skip
    rows = {"train": {"<GALAXY>": 7, "<GENERAL>": 2}, "holdout": {"<GALAXY>": 1}}
    card = model_card(cfg, metrics, "base/model", "/registry/faq", "Q: hi\nA:", rows)
    front = card.split("---")[1]
    assert "base_model: base/model" in front and "library_name: peft" in front and "- data/faq.jsonl" in front
    assert "| `<GALAXY>` | 7 | 1 |" in card and "| `<GENERAL>` | 2 | 0 |" in card and "9 training and\n1 holdout" in card
    assert "| optimizer steps | 32 (epoch 2.0) |" in card and "| holdout loss | 3.2100 |" in card
    assert "Test CPU, 2 threads" in card and "2.5 min of training" in card and "LoRA r=4, alpha=32" in card
    import peft

    assert f"- peft {peft.__version__}" in card
    assert "PeftModel.from_pretrained(base, '/registry/faq')" in card
    evaluated = with_evaluation(card, _report(0.5))
    assert "Not evaluated yet" not in evaluated and evaluated.count(EVALUATION_HEADING) == 1
    assert evaluated.index(EVALUATION_HEADING) < evaluated.index(USAGE_HEADING) < evaluated.index("## Framework")
