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
