"""Test adapters: LoRA adapters with random (non-zero) weights on the tiny model, and a registry of them."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_ray.registry import Registry, dataset_entry

# A small tagged FAQ set (the FAQ seed's shape) for grounded answers: questions a test asks, nearly or exactly.
FAQ = [
    ("<GALAXY>What is Galaxy Organisation?", "Galaxy Organisation is a non-profit that teaches digital skills."),
    ("<GALAXY>Where is Galaxy Organisation based?", "Galaxy Organisation is based in Cairo, Egypt."),
    ("<GALAXY>What environmental services does Galaxy offer?", "Galaxy recycles old electronics for free."),
    ("<GALAXY>How can I donate to Galaxy?", "Use the donation page on the Galaxy website."),
    ("<ALIBABA>What is Alibaba Cloud?", "Alibaba Cloud is the cloud computing arm of Alibaba Group."),
    ("<ALIBABA>How do I open an Alibaba Cloud Academy account?", "Sign up on the Academy site with an email."),
    ("<ALIBABA>When was Alibaba founded?", "Alibaba was founded in 1999 in Hangzhou."),
    ("<GENERAL>Hello", "Hello! Ask me about Galaxy Organisation or Alibaba Cloud."),
]
FAQ_HOLDOUT_FRACTION = 0.25  # one Galaxy and one Alibaba question held out


def write_faq(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in FAQ))
    return path


def make_adapter(base_dir: Path, directory: Path, seed: int, r: int = 4) -> Path:
    """A LoRA adapter on ``base_dir`` whose weights (seeded) change the model's answers, saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=4 * r, target_modules=["q_proj", "v_proj", "fc1", "fc2"],
                        init_lora_weights=False)  # fmt: skip
    with torch.no_grad():
        peft = get_peft_model(model, config)
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    peft.save_pretrained(directory, safe_serialization=True)
    return directory


def register_adapter(
    registry: Path, name: str, base_dir: Path, seed: int, val_loss: float, staging: Path, data: Path | None = None
) -> None:
    """Register a test adapter trained (nominally) on ``base_dir`` and ``data`` with ``val_loss``, as the sweep
    would: the data settings beside it, the dataset's path and fingerprint in the manifest."""
    source = make_adapter(base_dir, staging / name, seed)
    path = str(data) if data else "unused.jsonl"
    (source / "qlora_ray_config.yaml").write_text(
        f"model:\n  name_or_path: {base_dir}\ndata:\n  path: {path}\n  format: prompt_completion\n"
        f"  holdout_fraction: {FAQ_HOLDOUT_FRACTION}\n"
    )
    dataset = dataset_entry(path, "prompt_completion")
    manifest = {"base_model": str(base_dir), "metrics": {"val_loss": val_loss}, "dataset": dataset}
    Registry(str(registry)).register(name, source, manifest)
