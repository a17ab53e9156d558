"""The training loop: one explicit loop used by everything that trains. It imports no Ray.

Ray Train runs :func:`train` inside each worker (``jobs.train``); it can equally run in a plain process,
which is how the unit tests and the benchmarks drive it. The loop's contact with the outside world is:

- ``rows`` / ``holdout``: this rank's tokenised rows (``{"input_ids", "labels"}``),
- ``report(metrics, checkpoint_dir)``: called by every rank at every evaluation, with a directory holding a
  checkpoint on rank 0 when one is due (None otherwise),
- ``resume_dir``: a checkpoint directory to continue from.

Data order is a pure function of (seed, epoch) and dropout of (seed, rank, step), so a run resumed at step
``s`` sees exactly the batches and draws an uninterrupted run would have from step ``s`` on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.tokenize import IGNORE_INDEX, batch_order, collate
from jobs.dropout import use_skip_dropout
from qlora_ray.config import Config
from qlora_ray.console import clock
from qlora_ray.errors import QloraRayError

log = logging.getLogger(__name__)
# Per-step progress lines have a logger of their own: a sweep turns them off in its trials, whose progress the
# sweep's own trial lines show.
STEP_LOG = logging.getLogger(f"{__name__}.steps")

STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
Report = Callable[[dict[str, float], "str | None"], None]


class DivergedError(QloraRayError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite: more steps cannot recover; stop with the fix."""


@dataclass
class Dist:
    """This process's place in the data-parallel group (a single process when world == 1)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def all_min(self, value: int) -> int:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return int(tensor.item())


def steps_per_epoch(num_rows: int, cfg: Config) -> int:
    """Optimizer steps per epoch for one rank's rows (ranks agree on the minimum)."""
    return max(1, num_rows // (cfg.train.batch_size * cfg.train.grad_accum))


def total_steps(cfg: Config, per_epoch: int) -> int:
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))


def lr_lambda(cfg: Config, total: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup_ratio`` of the steps, then constant, cosine or linear decay."""
    warmup = math.ceil(cfg.train.warmup_ratio * total)
    schedule = cfg.train.lr_scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb  # only on workers: the one place it runs

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(
    cfg: Config,
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    holdout: list[dict[str, Any]],
    report: Report,
    dist: Dist | None = None,
    resume_dir: str | None = None,
) -> dict[str, float]:
    """Train ``model`` (a PEFT model, DDP-wrapped when world > 1) and return the final metrics."""
    dist = dist or Dist()
    peft_model = model.module if hasattr(model, "module") else model
    use_skip_dropout(peft_model, dist.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    per_epoch = dist.all_min(steps_per_epoch(len(rows), cfg))
    total = total_steps(cfg, per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    step, best, seconds_before = 0, math.inf, 0.0
    started, machine = time.perf_counter(), hardware(dist.device)
    if resume_dir:
        step, best, seconds_before = _load_state(resume_dir, peft_model, optimizer, scheduler, dist)
        log.info("resuming from step %d of %d", step, total)
    lengths = [len(r["input_ids"]) for r in rows]
    autocast = _autocast(cfg, dist.device)
    metrics: dict[str, float] = {}
    window = _Window()
    model.train()
    batches_epoch, batches = -1, []
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        if epoch != batches_epoch:
            batches_epoch = epoch
            batches = batch_order(lengths, cfg.train.batch_size, cfg.train.seed + epoch, cfg.train.group_by_length)
        # Dropout randomness is a function of (seed, rank, step): a resumed run draws what an unbroken one would.
        torch.manual_seed(cfg.train.seed + 1_000_003 * dist.rank + step)
        group = batches[offset * cfg.train.grad_accum : (offset + 1) * cfg.train.grad_accum]
        group_rows = [[rows[i] for i in b] for b in group]
        loss, tokens, padded = _optimizer_step(model, params, optimizer, group_rows, tokenizer, cfg, dist, autocast)
        scheduler.step()
        step += 1
        window.add(loss, tokens, padded)
        if dist.rank == 0 and (step % cfg.train.logging_steps == 0 or step == total):
            _log_progress(step, total, window, scheduler.get_last_lr()[0])
        eval_due = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total
        if eval_due:
            metrics = window.metrics(step, epoch + (offset + 1) / per_epoch, scheduler.get_last_lr()[0], dist)
            metrics.update(evaluate(model, holdout, tokenizer, cfg, dist, autocast))
            metrics["train_seconds"] = seconds_before + time.perf_counter() - started  # across resumes
            metrics["hardware"] = machine
            model.train()
            best = min(best, metrics["val_loss"])
            save_due = not cfg.train.save_every or step % cfg.train.save_every == 0 or step == total
            _report(report, metrics, peft_model, optimizer, scheduler, step, best, dist, save_due)
            window = _Window()
    return metrics


def _optimizer_step(model, params, optimizer, group_rows, tokenizer, cfg, dist, autocast):
    """One optimizer step over ``grad_accum`` micro-batches; the loss is averaged over label tokens."""
    batches = [
        collate(b, tokenizer.pad_token_id, pad_to_multiple_of=8 if dist.device != "cpu" else 1) for b in group_rows
    ]
    label_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    loss_sum = 0.0
    for i, batch in enumerate(batches):
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        sync = i == len(batches) - 1 or dist.world == 1
        # DDP all-reduces gradients only on the last micro-batch of the accumulation window.
        no_sync = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync, autocast:
            loss = completion_loss(model, batch) / max(1, label_tokens)
        loss.backward()
        loss_sum += loss.item()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm))
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        raise DivergedError(
            f"the training loss is {loss_sum:g} and the gradient norm {grad_norm:g}: the run diverged. Lower "
            f"train.lr (now {cfg.train.lr:g}) or train.max_grad_norm (now {cfg.train.max_grad_norm:g})"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    return loss_sum, real, padded


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the labelled (completion) tokens of ``batch``.

    Logits are computed only at the positions whose next token is labelled (``logits_to_keep`` as a
    boolean mask, which the model's own forward applies before its output head): the prompt positions
    never go through the vocabulary-sized projection and softmax.
    """
    targets = batch["labels"][:, 1:]
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep[:, :-1]], reduction="sum")


@torch.no_grad()
def evaluate(model, holdout, tokenizer, cfg, dist, autocast) -> dict[str, float]:
    """Token-weighted loss over this rank's holdout rows, summed over all ranks."""
    model.eval()
    loss_sum, count = 0.0, 0
    lengths = [len(r["input_ids"]) for r in holdout]
    for batch_ids in batch_order(lengths, cfg.train.batch_size * 2, seed=0, group_by_length=True):
        batch = collate([holdout[i] for i in batch_ids], tokenizer.pad_token_id)
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        with autocast:
            loss_sum += completion_loss(model, batch).item()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss_sum, count = dist.all_sum([loss_sum, float(count)])
    val_loss = loss_sum / count if count else math.nan
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}


class _Window:
    """Running totals between two evaluations."""

    def __init__(self) -> None:
        self.start, self.loss, self.steps, self.tokens, self.padded = time.perf_counter(), 0.0, 0, 0, 0

    def add(self, loss: float, tokens: int, padded: int) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        self.tokens, self.padded = self.tokens + tokens, self.padded + padded

    def tokens_per_second(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.start)

    def metrics(self, step: int, epoch: float, lr: float, dist: Dist) -> dict[str, float]:
        loss, tokens, padded = dist.all_sum([self.loss / max(1, self.steps), self.tokens, self.padded])
        return {
            "step": step,
            "epoch": round(epoch, 4),
            "loss": loss / dist.world,
            "lr": lr,
            "tokens_per_second": tokens / max(1e-9, time.perf_counter() - self.start),
            "useful_token_fraction": tokens / max(1, padded),
            "peak_memory_gb": peak_memory_gb(dist.device),
        }


def hardware(device: str) -> str:
    """What this worker trains on: the GPU's name, or the CPU's model and the torch threads in use."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "CPU")
    except OSError:
        model = "CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def peak_memory_gb(device: str) -> float:
    """Peak accelerator memory allocated by torch on CUDA; peak resident memory of this process on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1024**3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def _log_progress(step: int, total: int, window: _Window, lr: float) -> None:
    elapsed = time.perf_counter() - window.start
    eta = elapsed / max(1, window.steps) * (total - step)
    STEP_LOG.info(
        "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  eta %s",
        step, total, window.loss / max(1, window.steps), lr, window.tokens_per_second(), clock(eta),
    )  # fmt: skip


def _autocast(cfg: Config, device: str):
    from qlora_ray.model import compute_dtype

    if device.startswith("cuda") and compute_dtype(cfg.model, device) == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# --- checkpoints ---------------------------------------------------------------------------------------


def _report(report, metrics, peft_model, optimizer, scheduler, step, best, dist, save_due) -> None:
    if not (save_due and dist.rank == 0):
        report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="qlora-ckpt-") as directory:
        save_checkpoint(directory, peft_model, optimizer, scheduler, step, best, metrics)
        report(metrics, directory)


def save_checkpoint(directory, peft_model, optimizer, scheduler, step, best, metrics) -> None:
    """Adapter (a loadable PEFT directory), optimizer, scheduler and step. No base weights, and no tokenizer:
    it never changes during a run, so the exported adapter gets it once (``jobs.export.stage_adapter``).

    The random state needs no saving: the loop reseeds from (seed, rank, step) before every step.
    """
    peft_model.save_pretrained(os.path.join(directory, ADAPTER_DIR), safe_serialization=True)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        os.path.join(directory, "training_state.pt"),
    )
    Path(directory, STATE_FILE).write_text(json.dumps({"step": step, "best_val_loss": best, "metrics": metrics}))


def _load_state(directory, peft_model, optimizer, scheduler, dist) -> tuple[int, float, float]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(os.path.join(directory, ADAPTER_DIR, "adapter_model.safetensors"), device=dist.device)
    set_peft_model_state_dict(peft_model, weights)
    state = torch.load(os.path.join(directory, "training_state.pt"), map_location=dist.device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    meta = json.loads(Path(directory, STATE_FILE).read_text())
    return int(meta["step"]), float(meta["best_val_loss"]), float(meta["metrics"].get("train_seconds", 0.0))
