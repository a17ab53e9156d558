"""QLoRA fine-tuning on Ray Train: ``python -m jobs.train --config PATH [key=value ...]``.

Without a cluster address this starts a local Ray on this machine; under ``ray job submit`` or with
``RAY_ADDRESS`` set, the same code runs on the cluster. The driver checks the run (preflight: data,
targets, memory) and tokenises once; Ray Data shards the rows to ``train.num_workers`` workers, each of
which loads its own 4-bit base on its own device and runs :func:`jobs.loop.train`. Rerunning with the same
``run.name`` and ``run.storage_path`` resumes from the latest checkpoint.

The result is a plain PEFT adapter directory at ``<run.storage_path>/<run.name>/adapter``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.export import export_adapter
from jobs.loop import STEP_LOG, Dist, Report, seed_everything, train
from jobs.preflight import PreflightResult, prepare_run
from qlora_ray import cli, console
from qlora_ray.config import Config, from_dict
from qlora_ray.errors import QloraRayError
from qlora_ray.model import attach_lora, load_model, load_tokenizer
from qlora_ray.runtime import failure_summary, start_ray, storage_path

log = logging.getLogger(__name__)


class TrainError(QloraRayError, RuntimeError):
    """A run that cannot start or did not finish; the message says why and what to do."""


@dataclass
class TrainOutcome:
    adapter_dir: str
    metrics: dict[str, Any]
    run_path: str
    checkpoint: Any  # the ray.train.Checkpoint the adapter came from


# Ray Train runs the training function in a thread of its own, and glibc gives such a thread its own malloc
# arena, which hands large freed blocks back to the kernel after every step and faults them in again: on
# the starter model that cost 28% of CPU training throughput (7x the system time). One arena avoids it.
WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}


def worker_env() -> dict[str, str]:
    """Environment of every Train worker: one malloc arena, and the driver's console choice (verbose or not)."""
    return WORKER_ENV | {console.VERBOSE_ENV: "1" if console.verbose() else "0"}


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: load the base on this worker's device, attach LoRA, train."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = from_dict(loop_config["cfg"], source="train_loop_config")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    console.setup_worker(rank)
    device = str(ray.train.torch.get_device()) if cfg.train.use_gpu else "cpu"
    use_assigned_cpus()
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, device)
    seed_everything(cfg.train.seed)  # same LoRA initialisation on every rank
    model = attach_lora(base, cfg)
    if world > 1:
        device_ids = [torch.device(device).index] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    rows, holdout = _shard_rows("train"), _shard_rows("holdout")
    run_loop(cfg, model, tokenizer, rows, holdout, report, Dist(rank, world, device), ray.train.get_checkpoint(),
             step_lines=loop_config.get("step_lines", True))  # fmt: skip


def use_assigned_cpus() -> None:
    """As many torch threads as CPUs Ray assigned to this worker or trial.

    Ray sets OMP_NUM_THREADS to the floor of the worker's CPUs (1.99 -> 1); this rounds instead.
    """
    import ray
    import torch

    torch.set_num_threads(max(1, round(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))


def run_loop(
    cfg: Config, model: Any, tokenizer: Any, rows: list[dict[str, list[int]]], holdout: list[dict[str, list[int]]],
    report: Report, dist: Dist, checkpoint: Any, step_lines: bool = True,
) -> dict[str, float]:  # fmt: skip
    """Train ``model`` (LoRA attached, on its device) from ``checkpoint`` (a Ray checkpoint, or None to start).

    Shared by a Ray Train worker and a one-worker sweep trial (``tune.trial``), which differ only in where the
    model, rows and checkpoint come from and where ``report`` sends them. ``step_lines``: whether rank 0 logs its
    per-step progress (a sweep's trials do not; the sweep's own trial lines are their progress).
    """
    import torch

    STEP_LOG.setLevel(logging.NOTSET if step_lines else logging.WARNING)
    STEP_LOG.info(
        "rank %d/%d: %s base on %s, gradient checkpointing %s, %d torch threads",
        dist.rank, dist.world, cfg.model.quantization, dist.device,
        "on" if cfg.model.gradient_checkpointing else "off", torch.get_num_threads(),
    )  # fmt: skip
    if checkpoint is not None:
        log.info("restoring from checkpoint %s", checkpoint.path)
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_dir:
        return train(cfg, model, tokenizer, rows, holdout, report, dist, resume_dir)


def _shard_rows(name: str) -> list[dict[str, list[int]]]:
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in shard.iter_rows()]


def run_train(cfg: Config, prepared: tuple[Config, PreflightResult] | None = None) -> TrainOutcome:
    """Check, tokenise, train on Ray Train, and export the best adapter. Tests call this directly.

    ``prepared``: what :func:`prepare_run` returned for ``cfg``, when the caller ran it already.
    """
    import ray.train

    cfg, check = prepared or prepare_run(cfg)
    ray = start_ray()
    storage = storage_path(cfg, ray)
    trainer = build_trainer(cfg, check.data.train_rows, check.data.holdout_rows, storage, cfg.run.name)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainError(f"training failed: {failure_summary(err)}") from None
    best, metrics = best_checkpoint(result)
    adapter = export_adapter(best, cfg, metrics, f"{storage.rstrip('/')}/{cfg.run.name}", check)
    return TrainOutcome(adapter_dir=adapter, metrics=metrics, run_path=result.path, checkpoint=best)


def build_trainer(
    cfg: Config,
    train_rows: list[dict[str, list[int]]],
    holdout_rows: list[dict[str, list[int]]],
    storage: str,
    name: str,
    callbacks: list[Any] | None = None,
    resources: dict[str, float] | None = None,
    step_lines: bool = True,
) -> Any:
    """The Ray Train ``TorchTrainer`` of one run: the train job's and every sweep trial's.

    ``resources`` (per worker) default to ``train.cpus_per_worker`` CPUs plus one GPU with ``train.use_gpu``.
    ``step_lines``: whether rank 0 logs its per-step progress (a sweep's trials do not; the sweep reports them).
    Rerunning a trainer with the same ``storage``/``name`` resumes from its latest checkpoint.
    """
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.data.DataContext.get_current().enable_progress_bars = False  # rows are already tokenised: nothing to watch
    if resources is None:
        resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "step_lines": step_lines},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": worker_env()},
            logging_config=console.train_logging(),
            callbacks=callbacks or [],
        ),
        datasets={"train": ray.data.from_items(train_rows), "holdout": ray.data.from_items(holdout_rows)},
    )


def best_checkpoint(result: Any) -> tuple[Any, dict[str, Any]]:
    """The checkpoint of a finished Train run with the lowest holdout loss, and the metrics reported with it."""
    best = result.get_best_checkpoint("val_loss", "min") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise TrainError(f"the run at {result.path} produced no checkpoint")
    metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), result.metrics)
    return best, metrics


def main(argv: list[str] | None = None, prog: str = "python -m jobs.train") -> int:
    args = cli.parser(prog, cli.description(__doc__)).parse_args(argv)
    return cli.run(args, lambda: _report(run_train(cli.load(args, "train"))))


def _report(outcome: TrainOutcome) -> None:
    print(f"\nadapter: {outcome.adapter_dir}")
    print(f"holdout loss {outcome.metrics.get('val_loss', float('nan')):.4f} at step {outcome.metrics.get('step')}")
    print(f"run directory (checkpoints, Ray results): {outcome.run_path}")
    print("\nQuery it with transformers + peft alone (the model card in the adapter directory has the same code):")
    card = Path(outcome.adapter_dir, "README.md")
    print(card.read_text().split("```python\n", 1)[-1].split("```", 1)[0] if card.exists() else "(see README.md there)")


if __name__ == "__main__":
    sys.exit(main())
