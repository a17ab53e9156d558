"""Adapter export and registration: from a Ray Train checkpoint to the adapter directory users get.

A checkpoint holds the adapter and optimizer state of one step. :func:`export_adapter` writes the adapter
a run leaves at ``<run.storage_path>/<run.name>/adapter``; :func:`register_checkpoint` copies one into the
registry under ``run.name`` with its manifest. Both carry the same files: the PEFT weights and tokenizer,
the run's config (``qlora_ray_config.yaml``, from which Serve and evaluation rebuild prompts), its metrics
and a model card.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from data.templates import build_prompt
from data.tokenize import tag_counts
from jobs.loop import ADAPTER_DIR
from jobs.preflight import PreflightResult
from qlora_ray.card import model_card
from qlora_ray.config import Config
from qlora_ray.registry import ADAPTER_CONFIG, Registry, RegistryError, dataset_fingerprint, manifest_for
from qlora_ray.storage import upload_dir


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
    assert check.data is not None
    rows = {split: dict(tag_counts(getattr(check.data, f"{split}_examples"))) for split in ("train", "holdout")}
    out = Path(staging) / ADAPTER_DIR
    with checkpoint.as_directory() as source:
        shutil.copytree(Path(source) / ADAPTER_DIR, out)
    check.tokenizer.save_pretrained(out)  # the run's tokenizer: checkpoints do not carry it
    (out / ADAPTER_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    (out / "README.md").write_text(model_card(cfg, metrics, base, home, sample_prompt(cfg, check), rows))
    return out


def sample_prompt(cfg: Config, check: PreflightResult) -> str:
    """A holdout question in the training template: the example the model card's code asks."""
    assert check.data is not None
    return build_prompt(check.data.holdout_examples[0], cfg.data.template, check.tokenizer)


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
