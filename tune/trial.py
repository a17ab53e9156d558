"""A one-worker sweep trial, trained inside its own Tune actor: no Ray Train run, no worker group.

A trial with ``train.num_workers: 1`` would otherwise start a ``TorchTrainer`` of its own: a controller, a
worker, a placement group and a Ray Data split, and then load the base model, for every trial (37 to 50 s
before its first step with two trials starting at once on 2 cores; docs/benchmarks.md). Here the trial's
actor runs the same loop as a Train worker (:func:`jobs.train.run_loop`: same checkpoints, resume, reports),
with the rows it was handed by object reference, and reports and resumes through Ray Tune's own API.

The sweep reuses its actors from trial to trial (``reuse_actors``), and an actor keeps the base model it
loaded: each trial attaches a fresh LoRA adapter to it and takes it off again when it ends, so a trial after
the first starts training within seconds.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from jobs.loop import Dist, seed_everything
from jobs.train import run_loop, use_assigned_cpus
from qlora_ray import console
from qlora_ray.config import Config
from qlora_ray.model import attach_lora, load_model, load_tokenizer

log = logging.getLogger(__name__)

# (model settings, device) -> (tokenizer, base model) of the last base this actor loaded. One entry: a sweep
# trains one base, and a second would only hold memory that the next trial may need.
_BASE: dict[tuple[str, str], tuple[Any, Any]] = {}


Rows = list[dict[str, list[int]]]


def train_in_trial(cfg: Config, train_rows: Rows, holdout_rows: Rows) -> None:
    """Train one trial's adapter in this Tune actor, reporting every evaluation (and checkpoint) to Tune."""
    import ray.tune

    console.setup_worker(0)
    use_assigned_cpus()
    device = "cuda:0" if cfg.train.use_gpu else "cpu"  # Ray shows a GPU trial only its own GPU
    tokenizer, base = cached_base(cfg, device)
    seed_everything(cfg.train.seed)  # the LoRA initialisation a Train worker's run would have
    model = attach_lora(base, cfg)

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)

    try:
        run_loop(cfg, model, tokenizer, train_rows, holdout_rows, report, Dist(device=device),
                 ray.tune.get_checkpoint(), step_lines=False)  # fmt: skip
    finally:
        release(model)


def cached_base(cfg: Config, device: str) -> tuple[Any, Any]:
    """The tokenizer and base model for ``cfg.model`` on ``device``: loaded once per actor, then reused."""
    key = (json.dumps(cfg.model.model_dump(), sort_keys=True), device)
    if key not in _BASE:
        _BASE.clear()  # drop another base first, so that two are never held at once
        _BASE[key] = (load_tokenizer(cfg.model), load_model(cfg.model, device))
    else:
        log.info("reusing the %s base model loaded by an earlier trial in this actor", cfg.model.quantization)
    return _BASE[key]


def release(model: Any) -> None:
    """Take the trial's LoRA layers off the cached base (unmerged), leaving the base as it was loaded."""
    base = model.unload()
    if getattr(base, "_require_grads_hook", None) is not None:  # added with gradient checkpointing
        base.disable_input_require_grads()
