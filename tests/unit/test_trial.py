"""A one-worker sweep trial's cached base: a trial on a base an earlier trial used trains exactly as on a fresh one."""

import pytest
import torch
from test_loop import _cfg

from data.dataset import prepare
from data.tokenize import TokenizeSettings
from jobs.loop import seed_everything, train
from qlora_ray.model import attach_lora, load_model, load_tokenizer
from tune.trial import _BASE, cached_base, release


def _trial(cfg, base, tokenizer, data):
    seed_everything(cfg.train.seed)
    model = attach_lora(base, cfg)
    train(cfg, model, tokenizer, data.train_rows, data.holdout_rows, lambda metrics, directory: None)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return model, weights


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient checkpointing"])
def test_a_trial_on_the_cached_base_trains_exactly_as_on_a_freshly_loaded_one(tiny_phi_dir, checkpointing):
    cfg = _cfg(tiny_phi_dir, dropout=0.1, max_steps=4)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"gradient_checkpointing": checkpointing})})
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, TokenizeSettings.from_config(cfg))
    _, fresh = _trial(cfg, load_model(cfg.model), tokenizer, data)

    _BASE.clear()
    _, base = cached_base(cfg, "cpu")
    loaded = {k: v.clone() for k, v in base.state_dict().items()}
    other = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 4, "alpha": 8})})
    model, _ = _trial(other, base, tokenizer, data)  # an earlier trial, another rank
    release(model)
    assert not any("lora_" in name for name, _ in base.named_modules())  # its LoRA layers are off the base
    assert base.state_dict().keys() == loaded.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in loaded.items())  # and the base weights untouched
    assert getattr(base, "_require_grads_hook", None) is None

    again_tokenizer, again = cached_base(cfg, "cpu")
    assert again is base and again_tokenizer is not None  # not loaded again
    model, reused = _trial(cfg, again, tokenizer, data)
    assert reused.keys() == fresh.keys()
    assert all(torch.equal(reused[k], fresh[k]) for k in fresh)
    release(model)
    _BASE.clear()


def test_the_cache_holds_one_base(tiny_phi_dir):
    cfg = _cfg(tiny_phi_dir)
    _BASE.clear()
    _, first = cached_base(cfg, "cpu")
    unquantized = cfg.model_copy(update={"model": cfg.model.model_copy(update={"quantization": "none"})})
    _, second = cached_base(unquantized, "cpu")
    assert second is not first and len(_BASE) == 1  # another model's settings replace the base, never add one
    _BASE.clear()
