"""The training loop on its own (no Ray): learning, reporting cadence, schedule, exact resume."""

import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from data.dataset import prepare
from data.tokenize import TokenizeSettings, collate
from jobs.loop import (
    ADAPTER_DIR,
    STATE_FILE,
    Dist,
    DivergedError,
    completion_loss,
    evaluate,
    lr_lambda,
    seed_everything,
    train,
)
from qlora_ray.config import from_dict
from qlora_ray.model import attach_lora, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _cfg(model_dir, dropout=0.0, **train):
    return from_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "lora": {
                "r": 8,
                "alpha": 16,
                "dropout": dropout,
                "target_modules": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
            },
            "data": {"path": str(REPO / "data/samples/faq.jsonl"), "holdout_fraction": 0.2},
            "train": {"batch_size": 8, "max_seq_len": 64, "lr": 1e-2, "eval_every": 4, **train},
        }
    )


def _run(cfg, resume_dir=None, keep=None):
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, TokenizeSettings.from_config(cfg))
    model = attach_lora(load_model(cfg.model), cfg)
    untrained = evaluate(model, data.holdout_rows, tokenizer, cfg, Dist(), contextlib.nullcontext())["val_loss"]
    reports = []

    def report(metrics, checkpoint_dir):
        reports.append((dict(metrics), checkpoint_dir is not None))
        if checkpoint_dir and keep is not None:
            shutil.copytree(checkpoint_dir, keep / f"step{int(metrics['step'])}")

    final = train(cfg, model, tokenizer, data.train_rows, data.holdout_rows, report, resume_dir=resume_dir)
    lora = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return final, reports, lora, untrained


def test_loop_learns_and_reports_at_every_evaluation(tiny_phi_dir, tmp_path):
    cfg = _cfg(tiny_phi_dir, max_steps=12)
    final, reports, _, untrained = _run(cfg, keep=tmp_path)
    assert [int(m["step"]) for m, _ in reports] == [4, 8, 12]
    assert all(saved for _, saved in reports)
    losses = [untrained] + [m["val_loss"] for m, _ in reports]
    assert losses == sorted(losses, reverse=True) and losses[-1] < untrained - 0.2, losses  # the holdout loss drops
    for key in ("loss", "lr", "tokens_per_second", "useful_token_fraction", "val_loss", "val_perplexity", "epoch"):
        assert key in final
    assert 0.5 < final["useful_token_fraction"] <= 1.0
    checkpoint = tmp_path / "step12"
    assert json.loads((checkpoint / STATE_FILE).read_text())["step"] == 12
    adapter_files = {p.name for p in (checkpoint / ADAPTER_DIR).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter_files
    assert not any(name.startswith("tokenizer") for name in adapter_files)  # the export writes it, once per run
    from safetensors.torch import load_file

    saved = load_file(checkpoint / ADAPTER_DIR / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # adapter weights only, never base weights


def test_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(tiny_phi_dir, tmp_path):
    cfg = _cfg(tiny_phi_dir, dropout=0.1, max_steps=12, save_every=4)  # dropout draws must repeat on resume too
    _, _, uninterrupted, _ = _run(cfg, keep=tmp_path)
    _, reports, resumed, _ = _run(cfg, resume_dir=str(tmp_path / "step4"))
    assert [int(m["step"]) for m, _ in reports] == [8, 12]  # continued from step 4, not from zero
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_save_every_thins_checkpoints_but_not_reports(tiny_phi_dir):
    cfg = _cfg(tiny_phi_dir, max_steps=12, save_every=8)
    _, reports, _, _ = _run(cfg)
    assert [(int(m["step"]), saved) for m, saved in reports] == [(4, False), (8, True), (12, True)]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
        ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]),
        ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),
    ],
)
def test_warmup_then_schedule(tiny_phi_dir, schedule, expected):
    cfg = _cfg(tiny_phi_dir, lr_scheduler=schedule, warmup_ratio=0.4)
    factor = lr_lambda(cfg, total=5)
    assert [round(factor(s), 6) for s in range(5)] == pytest.approx(expected, abs=1e-6)


def test_paged_adamw_8bit_trains_on_cpu(tiny_phi_dir):
    cfg = _cfg(tiny_phi_dir, max_steps=4, optimizer="paged_adamw_8bit")
    final, _, lora, _ = _run(cfg)
    assert final["step"] == 4 and any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)


def test_completion_loss_equals_the_models_own_loss_over_labelled_tokens(tiny_phi_dir):
    """Logits only at labelled positions give exactly the full-logits loss, and its gradients."""
    cfg = _cfg(tiny_phi_dir)
    tokenizer = load_tokenizer(cfg.model)
    rows = prepare(cfg.data, tokenizer, TokenizeSettings.from_config(cfg)).train_rows[:6]
    batch = collate(rows, tokenizer.pad_token_id)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < int(batch["attention_mask"].sum())  # prompts are not labelled: some logits are skipped
    model = attach_lora(load_model(cfg.model), cfg)
    lora = [p for p in model.parameters() if p.requires_grad]
    ours = completion_loss(model, batch) / labelled
    ours.backward()
    ours_grads = [p.grad.clone() for p in lora]
    model.zero_grad()
    reference = model(**batch).loss
    reference.backward()
    torch.testing.assert_close(ours, reference)
    for mine, theirs in zip(ours_grads, [p.grad for p in lora], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_a_diverging_run_stops_with_the_fix(tiny_phi_dir):
    cfg = _cfg(tiny_phi_dir, max_steps=6, lr=0.5)
    cfg.lora.alpha = 1e30  # a LoRA scale of 1e29 overflows float32 as soon as lora_B leaves zero
    with pytest.raises(DivergedError, match=r"diverged\. Lower train\.lr \(now 0\.5\)"):
        _run(cfg)
