"""The model card (``README.md``) written into every exported adapter directory."""

from __future__ import annotations

from typing import Any

from jobs.config import Config


def usage_code(base: str, adapter: str, prompt: str) -> str:
    """Python that loads the adapter with transformers + peft alone and answers ``prompt``."""
    return f"""from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({base!r})
model = PeftModel.from_pretrained(base, {adapter!r})
tokenizer = AutoTokenizer.from_pretrained({adapter!r})
inputs = tokenizer({prompt!r}, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


def model_card(cfg: Config, metrics: dict[str, Any], base: str, adapter: str, prompt: str) -> str:
    """A Hugging Face model card: YAML front matter, training summary, and code that loads the adapter."""
    targets = (
        cfg.lora.target_modules if isinstance(cfg.lora.target_modules, str) else ", ".join(cfg.lora.target_modules)
    )
    val = metrics.get("val_loss")
    ppl = metrics.get("val_perplexity")
    return f"""---
base_model: {base}
library_name: peft
pipeline_tag: text-generation
tags:
- qlora
- lora
- ray
---

# {cfg.run.name}

A LoRA adapter for `{base}`, fine-tuned with qlora-ray on `{cfg.data.path}`
({cfg.model.quantization} base, r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, dropout={cfg.lora.dropout:g},
target modules: {targets}).

| metric | value |
| --- | --- |
| holdout loss | {val if val is None else f"{val:.4f}"} |
| holdout perplexity | {ppl if ppl is None else f"{ppl:.2f}"} |
| optimizer steps | {metrics.get("step")} |

Training: lr {cfg.train.lr:g} ({cfg.train.lr_scheduler}, warmup {cfg.train.warmup_ratio:g}), batch
{cfg.train.batch_size} x accumulation {cfg.train.grad_accum} x {cfg.train.num_workers} worker(s), optimizer
{cfg.train.optimizer}, max sequence length {cfg.train.max_seq_len}. Loss on the completion only; every
completion ends with the EOS token.

## Use

```python
{usage_code(base, adapter, prompt)}```
"""


EVALUATION_HEADING = "## Evaluation"
_SHOWN = [("exact_match", "exact match"), ("token_f1", "token F1"), ("rouge_l", "ROUGE-L"), ("bleu", "BLEU"),
          ("similarity", "similarity (all-MiniLM-L6-v2)"), ("similarity_match_accuracy", "similarity match accuracy"),
          ("holdout_loss", "holdout loss"), ("holdout_perplexity", "holdout perplexity")]  # fmt: skip


def evaluation_section(report: dict[str, Any]) -> str:
    """The card's evaluation: the numbers of ``eval.json``, base model against this adapter."""
    groups = report["groups"]
    overall = groups["overall"]
    settings = report.get("generation", {})
    lines = [
        EVALUATION_HEADING,
        "",
        f"Holdout split, {overall['base']['count']} rows, greedy answers of at most {settings.get('max_tokens')} "
        f"tokens, measured by `python -m jobs.evaluate` (similarity match: similarity >= "
        f"{report.get('similarity_threshold')}).",
        "",
        "| metric | base model | this adapter |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {label} | {overall['base'][key]:.4f} | {overall['tuned'][key]:.4f} |" for key, label in _SHOWN
              if key in overall["base"]]  # fmt: skip
    tags = [g for g in groups if g != "overall"]
    if tags:
        lines += ["", "Per tag (token F1 / similarity), base -> adapter:", ""]
        lines += ["| tag | rows | token F1 | similarity |", "| --- | --- | --- | --- |"]
        for tag in tags:
            b, t = groups[tag]["base"], groups[tag]["tuned"]
            lines.append(f"| {tag} | {b['count']} | {b['token_f1']:.3f} -> {t['token_f1']:.3f} | "
                         f"{b['similarity']:.3f} -> {t['similarity']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def with_evaluation(card: str, report: dict[str, Any]) -> str:
    """``card`` with its evaluation section replaced by (or, if it has none, given) the report's numbers."""
    section = evaluation_section(report)
    if EVALUATION_HEADING in card:
        before, rest = card.split(EVALUATION_HEADING, 1)
        after = rest.split("\n## ", 1)
        return before + section + ("\n## " + after[1] if len(after) > 1 else "")
    if "\n## Use" in card:
        before, after = card.split("\n## Use", 1)
        return before.rstrip("\n") + "\n\n" + section + "\n## Use" + after
    return card.rstrip("\n") + "\n\n" + section if card.strip() else section
