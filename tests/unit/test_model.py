import pytest
import torch

from qlora_ray.config import from_dict
from qlora_ray.model import (
    ModelError,
    attach_lora,
    check_vocabulary,
    load_model,
    load_tokenizer,
    lora_parameter_count,
    model_skeleton,
    resolve_targets,
)

PHI2_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


def _cfg(model_dir, **sections):
    raw = {"model": {"name_or_path": str(model_dir)}, "lora": {"r": 4, "alpha": 8, "target_modules": PHI2_TARGETS}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return from_dict(raw)


def test_nf4_load_on_cpu_is_4bit_double_quantised(tiny_phi_dir):
    import bitsandbytes as bnb

    model = load_model(_cfg(tiny_phi_dir).model, device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.quant_state.nested  # double quantisation
    assert layer.compute_dtype == torch.float32  # fp32 compute on CPU
    assert layer.weight.device.type == "cpu"


def test_unquantised_load_keeps_plain_linear_layers(tiny_phi_dir):
    model = load_model(_cfg(tiny_phi_dir, model={"quantization": "none"}).model)
    assert type(model.model.layers[0].mlp.fc1) is torch.nn.Linear


def test_one_optimizer_step_changes_only_lora_weights(tiny_phi_dir):
    cfg = _cfg(tiny_phi_dir)
    model = attach_lora(load_model(cfg.model), cfg)
    assert sorted(model.peft_config["default"].target_modules) == sorted(PHI2_TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    expected = lora_parameter_count(resolve_targets(model_skeleton(cfg.model), cfg.lora, "tiny"), cfg.lora.r)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == expected

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids = torch.randint(2, 80, (2, 12))
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the optimizer step changed nothing"
    assert all("lora_" in k for k in changed), sorted(changed - {k for k in changed if "lora_" in k})
    assert any("lora_B" in k for k in changed)  # B starts at zero; it must move for the adapter to matter


def test_gradient_checkpointing_is_non_reentrant(tiny_phi_dir):
    cfg = _cfg(tiny_phi_dir)
    model = attach_lora(load_model(cfg.model), cfg)
    layer = model.base_model.model.model.layers[0]
    assert model.base_model.model.is_gradient_checkpointing
    assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is False


def test_target_that_matches_nothing_names_it_and_lists_real_layers(tiny_phi_dir):
    cfg = _cfg(tiny_phi_dir, lora={"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    with pytest.raises(ModelError) as info:
        resolve_targets(model_skeleton(cfg.model), cfg.lora, "phi")
    text = str(info.value)
    assert "o_proj" in text.split("Its linear")[0]
    assert "dense, fc1, fc2, k_proj, q_proj, v_proj" in text


def test_all_linear_excludes_the_output_head(tiny_phi_dir):
    cfg = _cfg(tiny_phi_dir, lora={"target_modules": "all-linear"})
    names = resolve_targets(model_skeleton(cfg.model), cfg.lora, "phi")
    assert {n.rsplit(".", 1)[-1] for n in names} == set(PHI2_TARGETS)


def test_missing_pad_token_becomes_eos_without_new_tokens(tiny_phi_dir):
    tokenizer = load_tokenizer(_cfg(tiny_phi_dir).model)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    check_vocabulary(model_skeleton(_cfg(tiny_phi_dir).model), tokenizer, "tiny")
    tokenizer.add_tokens([f"new{i}" for i in range(100)])
    with pytest.raises(ModelError, match="new tokens would need resized embeddings"):
        check_vocabulary(model_skeleton(_cfg(tiny_phi_dir).model), tokenizer, "tiny")


def test_unreachable_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = from_dict({"model": {"name_or_path": "nobody/no-such-model"}})
    with pytest.raises(ModelError, match="must be a local Hugging Face directory"):
        model_skeleton(cfg.model)
