"""The model card (``README.md``) written into every exported adapter directory."""

from __future__ import annotations

from typing import Any

from data.formats import FORMATS
from qlora_ray import metrics as answer_metrics  # not `metrics`: model_card's `metrics` are a run's numbers
from qlora_ray.config import Config

EVALUATION_HEADING = "## Evaluation"
USAGE_HEADING = "## How to get started"


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


FRAMEWORKS = ["qlora-ray", "peft", "transformers", "torch", "bitsandbytes", "ray", "datasets", "pyarrow"]


def framework_versions() -> dict[str, str]:
    """Installed versions of the packages that trained (and load) the adapter."""
    import importlib.metadata

    versions = {}
    for name in FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def model_card(
    cfg: Config,
    metrics: dict[str, Any],
    base: str,
    adapter: str,
    prompt: str,
    rows: dict[str, dict[str, int]],
) -> str:
    """A Hugging Face model card: metadata, details, data, procedure, evaluation, code, versions.

    ``rows`` counts the examples per split and tag (``{"train": {"<GALAXY>": 801, ...}, "holdout": {...}}``).
    """
    train = cfg.train
    targets = cfg.lora.target_modules
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    val, ppl, seconds = metrics.get("val_loss"), metrics.get("val_perplexity"), metrics.get("train_seconds")
    tags = sorted(set(rows.get("train", {})) | set(rows.get("holdout", {})))
    data_table = "\n".join(
        f"| `{tag}` | {rows.get('train', {}).get(tag, 0)} | {rows.get('holdout', {}).get(tag, 0)} |" for tag in tags
    )
    totals = {split: sum(counts.values()) for split, counts in rows.items()}
    duration = "not recorded" if seconds is None else f"{seconds / 60:.1f} min of training (evaluations included)"
    devices = "GPU" if train.use_gpu else "CPU"
    template = cfg.data.template.encode("unicode_escape").decode()
    shown = cfg.data.format in FORMATS and FORMATS[cfg.data.format].uses_template  # unknown while "auto"
    template = f", template `{template}`" if shown else ""
    versions = "\n".join(f"- {name} {version}" for name, version in framework_versions().items())
    return f"""---
base_model: {base}
library_name: peft
pipeline_tag: text-generation
tags:
- qlora
- lora
- ray
datasets:
- {cfg.data.path}
---

# {cfg.run.name}

A LoRA adapter for `{base}`, fine-tuned with qlora-ray (QLoRA: the base model frozen in
{cfg.model.quantization}, low-rank adapters trained on top).

## Model details

- Base model: `{base}`, loaded in {cfg.model.quantization} for training
- Adapter: LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, dropout={cfg.lora.dropout:g}, on {targets}
- Prompt format: `{cfg.data.format}`{template}

## Intended use

Answering questions like those of its training data (`{cfg.data.path}`), through the same prompt template,
for example behind `python -m serve` (which builds prompts the way training did). It knows only what that
data and its base model know; check the evaluation below before relying on its answers.

## Training data

`{cfg.data.path}` ({cfg.data.format}), split by seed {cfg.data.seed}: {totals.get("train", 0)} training and
{totals.get("holdout", 0)} holdout rows.

| tag | train | holdout |
| --- | --- | --- |
{data_table}

## Training procedure

| setting | value |
| --- | --- |
| learning rate | {train.lr:g} ({train.lr_scheduler}, warmup {train.warmup_ratio:g}) |
| batch | {train.batch_size} x accumulation {train.grad_accum} x {train.num_workers} worker(s) |
| optimizer | {train.optimizer}, weight decay {train.weight_decay:g}, max grad norm {train.max_grad_norm:g} |
| max sequence length | {train.max_seq_len} |
| optimizer steps | {metrics.get("step")} (epoch {metrics.get("epoch", "?")}) |
| seed | {train.seed} |
| hardware | {train.num_workers} Ray Train worker(s) on {devices}: {metrics.get("hardware", "not recorded")} |
| time | {duration} |
| holdout loss | {"not recorded" if val is None else f"{val:.4f}"} |
| holdout perplexity | {"not recorded" if ppl is None else f"{ppl:.2f}"} |

Loss on the completion only; every completion ends with the EOS token.

{EVALUATION_HEADING}

Not evaluated yet: `python -m jobs.evaluate --config CONFIG --adapter {cfg.run.name}` writes the numbers here.

{USAGE_HEADING}

```python
{usage_code(base, adapter, prompt)}```

## Framework versions

{versions}
"""


# Not answer metrics (they come from the holdout loss, measured once over the whole split): shown after the table's.
_LOSSES = [("holdout_loss", "holdout loss"), ("holdout_perplexity", "holdout perplexity")]
PER_TAG = ("token_f1", "similarity")  # the per-tag table's columns: a few metrics keep it narrow


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
    shown = [(m.name, m.label, m.fmt) for m in answer_metrics.METRICS] + [(k, label, ".4f") for k, label in _LOSSES]
    for key, label, fmt in shown:
        if key in overall["base"]:  # an eval.json from before a metric joined the table lacks it
            lines.append(f"| {label} | {overall['base'][key]:{fmt}} | {overall['tuned'][key]:{fmt}} |")
    tags = [g for g in groups if g != "overall"]
    if tags:
        lines += ["", *per_tag_table({tag: groups[tag] for tag in tags})]
    return "\n".join(lines) + "\n"


def per_tag_table(groups: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The lines of the per-tag table: each tag's rows and :data:`PER_TAG` metrics, base -> adapter."""
    columns = [answer_metrics.by_name(name) for name in PER_TAG]
    header = "| tag | rows | " + " | ".join(m.label for m in columns) + " |"
    lines = ["Per tag, base -> adapter:", "", header, "| --- " * (len(columns) + 2) + "|"]
    for tag, sides in groups.items():
        base, tuned = sides["base"], sides["tuned"]
        cells = [f"{base[m.name]:{m.short_fmt}} -> {tuned[m.name]:{m.short_fmt}}" for m in columns]
        lines.append(f"| `{tag}` | {base['count']} | " + " | ".join(cells) + " |")
    return lines


def with_evaluation(card: str, report: dict[str, Any]) -> str:
    """``card`` with its evaluation section replaced by (or, if it has none, given) the report's numbers."""
    section = evaluation_section(report)
    if EVALUATION_HEADING in card:
        before, rest = card.split(EVALUATION_HEADING, 1)
        after = rest.split("\n## ", 1)
        return before + section + ("\n## " + after[1] if len(after) > 1 else "")
    if f"\n{USAGE_HEADING}" in card:
        before, after = card.split(f"\n{USAGE_HEADING}", 1)
        return before.rstrip("\n") + "\n\n" + section + f"\n{USAGE_HEADING}" + after
    return card.rstrip("\n") + "\n\n" + section if card.strip() else section
