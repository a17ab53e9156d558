"""Test adapters: LoRA adapters with random (non-zero) weights on the tiny model, and a registry of them."""

from __future__ import annotations

from pathlib import Path

from jobs.artifacts import Registry


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


def register_adapter(registry: Path, name: str, base_dir: Path, seed: int, val_loss: float, staging: Path) -> None:
    """Register a test adapter trained (nominally) on ``base_dir`` with ``val_loss``, as the sweep would."""
    source = make_adapter(base_dir, staging / name, seed)
    (source / "qlora_ray_config.yaml").write_text(
        f"model:\n  name_or_path: {base_dir}\ndata:\n  path: unused.jsonl\n  format: prompt_completion\n"
    )
    manifest = {"base_model": str(base_dir), "metrics": {"val_loss": val_loss}}
    Registry(str(registry)).register(name, source, manifest)
