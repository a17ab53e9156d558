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
import json
import logging
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from data.templates import build_prompt
from jobs.artifacts import ADAPTER_CONFIG
from jobs.config import Config, ConfigError, config_from_cli, from_dict, pin_local_paths
from jobs.loop import ADAPTER_DIR, Dist, seed_everything, train
from jobs.model import attach_lora, load_model, load_tokenizer
from jobs.preflight import PreflightResult, run_preflight

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
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


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: load the base on this worker's device, attach LoRA, train."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    cfg = from_dict(loop_config["cfg"], source="train_loop_config")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    device = str(ray.train.torch.get_device()) if cfg.train.use_gpu else "cpu"
    # Ray sets OMP_NUM_THREADS to the floor of the worker's CPUs (1.99 -> 1); round instead.
    torch.set_num_threads(max(1, round(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
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


def prepare_run(cfg: Config) -> tuple[Config, PreflightResult]:
    """Resolve local paths and run the preflight (data, targets, memory); raise with every problem found."""
    cfg = pin_local_paths(cfg)
    check = run_preflight(cfg)
    for line in check.lines:
        log.info("%s", line)
    if check.errors:
        raise TrainError("the run cannot start:\n" + "\n".join(f"- {e}" for e in check.errors))
    assert check.data is not None
    if not check.data.holdout_rows:
        raise TrainError("no holdout rows to evaluate on: set data.holdout_fraction > 0 (e.g. 0.1)")
    if cfg.data.format == "auto":  # saved with the adapter: Serve and evaluation build prompts by this format
        cfg = cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"format": check.data.holdout_examples[0]["format"]})}
        )
    return cfg, check


def sample_prompt(cfg: Config, check: PreflightResult) -> str:
    """A holdout question in the training template: the example the model card's code asks."""
    assert check.data is not None
    return build_prompt(check.data.holdout_examples[0], cfg.data.template, check.tokenizer)


def build_trainer(
    cfg: Config,
    train_rows: list[dict[str, list[int]]],
    holdout_rows: list[dict[str, list[int]]],
    storage: str,
    name: str,
    callbacks: list[Any] | None = None,
    resources: dict[str, float] | None = None,
) -> Any:
    """The Ray Train ``TorchTrainer`` of one run: the train job's and every sweep trial's.

    ``resources`` (per worker) default to ``train.cpus_per_worker`` CPUs plus one GPU with ``train.use_gpu``.
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
        train_loop_config={"cfg": cfg.model_dump()},
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
            worker_runtime_env={"env_vars": WORKER_ENV},
            callbacks=callbacks or [],
        ),
        datasets={"train": ray.data.from_items(train_rows), "holdout": ray.data.from_items(holdout_rows)},
    )


def failure_summary(err: BaseException) -> str:
    """One line per failed worker (its exception's message, not its traceback), or the error's message."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        return "; ".join(f"rank {rank}: {_last_line(error)}" for rank, error in sorted(failures.items()))
    return _last_line(err)


def _last_line(err: BaseException) -> str:
    # Errors raised in a Ray worker carry the remote traceback in their text; the last line is the message,
    # after the exception's qualified name ("jobs.loop.DivergedError: ...").
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return re.sub(r"^[A-Za-z_][\w.]*(Error|Exception): ", "", lines[-1].strip())


def best_checkpoint(result: Any) -> tuple[Any, dict[str, Any]]:
    """The checkpoint of a finished Train run with the lowest holdout loss, and the metrics reported with it."""
    best = result.get_best_checkpoint("val_loss", "min") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise TrainError(f"the run at {result.path} produced no checkpoint")
    metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), result.metrics)
    return best, metrics


def start_ray() -> Any:
    """Connect to the cluster (``RAY_ADDRESS``, or the job's under ``ray job submit``) or start a local Ray.

    A local Ray always gets its dashboard: it serves the State API, through which Ray Train's placement-group
    cleaner checks that a run's controller is alive. Without it that check fails, and after a few minutes the
    cleaner may take a run for dead and remove its workers (seen on a 124-step run); a sweep also needs it to
    release the resources of the trials ASHA stops.
    """
    import ray

    if ray.is_initialized():
        return ray
    try:
        context = ray.init(log_to_driver=True, include_dashboard=True)
    except (ConnectionError, ray.exceptions.AuthenticationError) as err:
        reason = _last_line(err) + (f": {err.__cause__}" if err.__cause__ else "")
        raise TrainError(
            f"cannot reach the Ray cluster ({reason}). Check that it runs (ray status) and that "
            "RAY_ADDRESS is right; clusters started with `ray start` need RAY_AUTH_MODE=token on Ray >= 2.60"
        ) from None
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)
    return ray


def storage_path(cfg: Config, ray: Any) -> str:
    """``run.storage_path``, refused when it is a local path on a cluster of several nodes."""
    storage = cfg.run.storage_path
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if "://" not in storage and len(alive) > 1:
        raise TrainError(
            f"run.storage_path {storage!r} is a local path, but this cluster has {len(alive)} nodes: workers on "
            "other nodes could not write checkpoints there. Use shared storage: s3://..., gs://..., or an NFS "
            "mount given as a path that every node sees (then set it as file:///mnt/...)"
        )
    return storage


def export_adapter(checkpoint: Any, cfg: Config, metrics: dict[str, Any], run_dir: str, check: PreflightResult) -> str:
    """Copy the checkpoint's adapter to ``<run_dir>/adapter`` with its config, metrics and a model card."""
    destination = f"{run_dir}/{ADAPTER_DIR}"
    with tempfile.TemporaryDirectory() as staging:
        upload_dir(stage_adapter(checkpoint, cfg, metrics, check, staging, destination), destination)
    return destination


def stage_adapter(
    checkpoint: Any, cfg: Config, metrics: dict[str, Any], check: PreflightResult, staging: str, home: str
) -> Path:
    """Write the adapter directory users get into ``staging``: weights, tokenizer, config, metrics, card.

    ``home`` is where it will live (the model card's code loads it from there); ``check`` is the run's
    preflight, whose data gives the card its rows per split and tag and its example question.
    """
    from data.tokenize import tag_counts
    from jobs.card import model_card

    assert check.data is not None
    rows = {split: dict(tag_counts(getattr(check.data, f"{split}_examples"))) for split in ("train", "holdout")}
    out = Path(staging) / ADAPTER_DIR
    with checkpoint.as_directory() as source:
        shutil.copytree(Path(source) / ADAPTER_DIR, out)
    (out / ADAPTER_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    (out / "README.md").write_text(model_card(cfg, metrics, base, home, sample_prompt(cfg, check), rows))
    return out


def register_checkpoint(
    cfg: Config,
    checkpoint: Any,
    metrics: dict[str, Any],
    check: PreflightResult,
    source: dict[str, Any],
    metric: str = "val_loss",
    mode: str = "min",
) -> str:
    """Copy a checkpoint's adapter into ``run.registry`` as ``run.name``, with manifest and card; its location.

    ``source["path"]`` names the run (train run or sweep) behind it: rerunning that run replaces its adapter,
    while a name another run registered is refused.
    """
    from jobs.artifacts import Registry, dataset_fingerprint, manifest_for

    assert check.data is not None
    registry, name = Registry(cfg.run.registry), cfg.run.name
    replace = registered_by(cfg, source["path"])
    manifest = manifest_for(
        cfg, metrics, data_fingerprint=dataset_fingerprint(cfg.data.path),
        rows={"train": len(check.data.train_rows), "holdout": len(check.data.holdout_rows)}, source=source,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as staging:
        adapter = stage_adapter(checkpoint, cfg, metrics, check, staging, registry.location_of(name))
        entry = registry.register(name, adapter, manifest, metric=metric, mode=mode, overwrite=replace)
    return entry.uri


def registered_by(cfg: Config, path: str) -> bool:
    """Whether the run at ``path`` registered ``run.name`` before (a rerun replaces it).

    Raises RegistryError when another run holds that name: checked before a run starts, not after it.
    """
    from jobs.artifacts import Registry, RegistryError

    existing = Registry(cfg.run.registry).find(cfg.run.name)
    if existing is None:
        return False
    origin = existing.manifest.get("source", {}).get("path")
    if origin != path:
        raise RegistryError(
            f"the registry {cfg.run.registry} already holds an adapter named {cfg.run.name!r} from "
            f"{origin or 'another run'}; give this run another run.name (or remove that adapter)"
        )
    return True


def filesystem_of(location: str) -> tuple[Any, str]:
    """The pyarrow filesystem and inner path of a local path or a URI (s3://, gs://, file://)."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(location if "://" in location else f"file://{Path(location).resolve()}")


def upload_dir(source: Path, destination: str) -> None:
    """Copy a local directory to a local path or a pyarrow filesystem URI (s3://, gs://, file://)."""
    import pyarrow.fs

    filesystem, path = filesystem_of(destination)
    filesystem.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(
        str(source), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=filesystem
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        outcome = run_train(config_from_cli("python -m jobs.train", __doc__.split("\n")[0], argv, "train.lr=1e-4"))
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
