"""QLoRA fine-tuning on Ray Train: ``python -m jobs.train --config PATH [key=value ...]``.

Without a cluster address this starts a local Ray on this machine; under ``ray job submit`` or with
``RAY_ADDRESS`` set, the same code runs on the cluster. The driver checks the run (preflight: data,
targets, memory) and tokenises once; Ray Data shards the rows to ``train.num_workers`` workers, each of
which loads its own 4-bit base on its own device and runs :func:`jobs.loop.train`. Rerunning with the same
``run.name`` and ``run.storage_path`` resumes from the latest checkpoint.

The result is a plain PEFT adapter directory at ``<run.storage_path>/<run.name>/adapter``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from data.templates import build_prompt
from jobs.config import Config, ConfigError, from_dict, load_config
from jobs.loop import ADAPTER_DIR, Dist, seed_everything, train
from jobs.model import attach_lora, load_model, load_tokenizer

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """A run that cannot start or did not finish; the message says why and what to do."""


@dataclass
class TrainOutcome:
    adapter_dir: str
    metrics: dict[str, Any]
    run_path: str


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: load the base on this worker's device, attach LoRA, train."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = from_dict(loop_config["cfg"], source="train_loop_config")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    device = str(ray.train.torch.get_device()) if cfg.train.use_gpu else "cpu"
    seed_everything(cfg.train.seed)  # same LoRA initialisation on every rank
    tokenizer = load_tokenizer(cfg.model)
    model = attach_lora(load_model(cfg.model, device), cfg)
    log.info(
        "rank %d/%d: %s base on %s, gradient checkpointing %s, %d torch threads",
        rank, world, cfg.model.quantization, device, "on" if cfg.model.gradient_checkpointing else "off",
        torch.get_num_threads(),
    )  # fmt: skip
    if world > 1:
        device_ids = [torch.device(device).index] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    rows = _shard_rows("train")
    holdout = _shard_rows("holdout")

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        log.info("restoring from checkpoint %s", checkpoint.path)
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_dir:
        train(cfg, model, tokenizer, rows, holdout, report, Dist(rank, world, device), resume_dir)


def _shard_rows(name: str) -> list[dict[str, list[int]]]:
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in shard.iter_rows()]


def run_train(cfg: Config) -> TrainOutcome:
    """Check, tokenise, train on Ray Train, and export the best adapter. Tests call this directly."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.preflight import run_preflight

    cfg = _absolute_local_paths(cfg)
    check = run_preflight(cfg)
    for line in check.lines:
        log.info("%s", line)
    if check.errors:
        raise TrainError("the run cannot start:\n" + "\n".join(f"- {e}" for e in check.errors))
    assert check.data is not None
    if not check.data.holdout_rows:
        raise TrainError("no holdout rows to evaluate on: set data.holdout_fraction > 0 (e.g. 0.1)")
    _start_ray(cfg.run.local_dashboard)
    ray.data.DataContext.get_current().enable_progress_bars = False  # rows are already tokenised: nothing to watch
    storage = _storage_path(cfg, ray)
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.model_dump()},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets={
            "train": ray.data.from_items(check.data.train_rows),
            "holdout": ray.data.from_items(check.data.holdout_rows),
        },
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainError(f"training failed: {result.error}")
    best = result.get_best_checkpoint("val_loss", "min") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise TrainError(f"the run at {result.path} produced no checkpoint")
    metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), result.metrics)
    prompt = build_prompt(check.data.holdout_examples[0], cfg.data.template, check.tokenizer)
    adapter = export_adapter(best, cfg, metrics, storage, prompt)
    return TrainOutcome(adapter_dir=adapter, metrics=metrics, run_path=result.path)


def _absolute_local_paths(cfg: Config) -> Config:
    """Workers do not share the driver's working directory: pin local paths before shipping the config."""
    raw = cfg.model_dump()
    if Path(cfg.model.name_or_path).is_dir():
        raw["model"]["name_or_path"] = str(Path(cfg.model.name_or_path).resolve())
    if "://" not in cfg.run.storage_path:
        raw["run"]["storage_path"] = str(Path(cfg.run.storage_path).resolve())
    return from_dict(raw)


def _start_ray(dashboard: bool) -> None:
    import ray

    if ray.is_initialized():
        return
    # No address: connect to RAY_ADDRESS or the job's cluster if there is one, else start a local Ray
    # (include_dashboard only applies to that local one).
    context = ray.init(log_to_driver=True, include_dashboard=dashboard)
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)


def _storage_path(cfg: Config, ray: Any) -> str:
    storage = cfg.run.storage_path
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if "://" not in storage and len(alive) > 1:
        raise TrainError(
            f"run.storage_path {storage!r} is a local path, but this cluster has {len(alive)} nodes: workers on "
            "other nodes could not write checkpoints there. Use shared storage: s3://..., gs://..., or an NFS "
            "mount given as a path that every node sees (then set it as file:///mnt/...)"
        )
    return storage


def export_adapter(checkpoint: Any, cfg: Config, metrics: dict[str, Any], storage: str, prompt: str) -> str:
    """Copy the checkpoint's adapter to ``<storage>/<run.name>/adapter`` with config, metrics and a card."""
    import pyarrow.fs

    from jobs.card import model_card

    destination = f"{storage.rstrip('/')}/{cfg.run.name}/{ADAPTER_DIR}"
    with checkpoint.as_directory() as source, tempfile.TemporaryDirectory() as staging:
        out = Path(staging) / ADAPTER_DIR
        shutil.copytree(Path(source) / ADAPTER_DIR, out)
        (out / "qlora_ray_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        (out / "README.md").write_text(model_card(cfg, metrics, base, destination, prompt))
        filesystem, path = pyarrow.fs.FileSystem.from_uri(
            destination if "://" in destination else f"file://{destination}"
        )
        filesystem.create_dir(path, recursive=True)
        pyarrow.fs.copy_files(
            str(out), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=filesystem
        )
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        outcome = run_train(load_config(args.config, args.overrides))
    except (ConfigError, TrainError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"\nadapter: {outcome.adapter_dir}")
    print(f"holdout loss {outcome.metrics.get('val_loss', float('nan')):.4f} at step {outcome.metrics.get('step')}")
    print(f"run directory (checkpoints, Ray results): {outcome.run_path}")
    print("\nQuery it with transformers + peft alone (the model card in the adapter directory has the same code):")
    card = Path(outcome.adapter_dir, "README.md")
    print(card.read_text().split("```python\n", 1)[-1].split("```", 1)[0] if card.exists() else "(see README.md there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
