"""The adapter registry: named PEFT adapters with manifests, and a ``best`` pointer per base model.

The sweep writes it; evaluation and Serve read it. A registry is a local directory or a pyarrow filesystem
URI (``file:///...``, ``s3://...``, ``gs://...``), and every read and write goes through ``pyarrow.fs`` so both
behave the same::

    <registry>/adapters/<name>/        a plain PEFT adapter directory plus manifest.json
    <registry>/best/<base-key>.json    {"name", "metric", "value", "mode", "updated", "base_model"}

An adapter is listed only once its ``manifest.json`` exists, and the manifest is always written last: on a
local filesystem the adapter is staged under a hidden sibling and renamed into place; object stores have no
directory rename, so there the files go straight to ``adapters/<name>/`` and the manifest still comes last.
Either way a half-copied adapter is never listed. Writers are expected to be one process (the sweep driver);
there is no locking.

From the shell: ``qlora-ray artifacts list|show|best`` (``jobs/artifacts.py``).

Nothing heavy is imported here (no torch, transformers or Ray): Serve ingress processes import this module.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import numbers
import os
import posixpath
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs
import yaml
from pydantic import ValidationError

from qlora_ray.config import Config, ConfigError, DataConfig
from qlora_ray.errors import QloraRayError
from qlora_ray.storage import StorageError, filesystem_of, is_uri, write_bytes_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "qlora_ray_config.yaml"  # the run config saved beside a trained adapter
NAME_RULE = "1-128 letters, digits, '-', '_' or '.', starting with a letter or digit, and no '..'"
NAME_EXAMPLE = "phi2-faq-r16-lr2e-4"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A hub id such as "microsoft/phi-2" or "gpt2": at most one slash, no path tricks.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
LIST_HINT = "list the registry with: qlora-ray artifacts list"


class RegistryError(QloraRayError, ValueError):
    """A registry operation that cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class Entry:
    """One registered adapter: ``uri`` is its directory, as a path (local registry) or a URI."""

    name: str
    uri: str
    manifest: dict[str, Any] = field(hash=False)


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter name, else raise :class:`RegistryError`.

    Names become path components, so anything that could climb out of ``adapters/`` (``..``, ``/``) or hide
    (a leading ``.``, which staging directories use) is refused before it touches a path.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise RegistryError(f"invalid adapter name {name!r}: use {NAME_RULE} (e.g. {NAME_EXAMPLE!r})")
    return name


def base_key(base_model: str) -> str:
    """The base model id made safe as a file name, stable across machines.

    A hub id keeps its readable form (``microsoft/phi-2`` -> ``microsoft--phi-2``). Anything else (a local
    directory, ``builtin:...``) becomes its last component plus a short sha256 of the whole string, so two
    different directories that end in the same name never share a pointer.
    """
    if _HUB_ID.fullmatch(base_model) and ".." not in base_model:
        return base_model.replace("/", "--")
    normalised = posixpath.normpath(base_model.replace(os.sep, "/"))
    last = re.sub(r"[^A-Za-z0-9_.-]+", "-", posixpath.basename(normalised)).strip("-.") or "model"
    return f"{last[:64]}-{hashlib.sha256(normalised.encode()).hexdigest()[:12]}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Registry:
    """Named adapters under one location; see the module docstring for the layout."""

    def __init__(self, location: str):
        if not location:
            raise RegistryError("the registry location is empty: give a directory or a URI (s3://bucket/registry)")
        self.location = location
        self.is_uri = is_uri(location)
        try:
            self.fs, self.root = filesystem_of(location)
        except StorageError as err:
            raise RegistryError(f"cannot open registry: {err}") from None
        # Only a local filesystem renames directories; object stores copy object by object.
        self._renames = isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Registry({self.location!r})"

    # Reading

    def list(self) -> list[Entry]:
        """Every complete adapter, sorted by name (staging directories and those without a manifest skipped)."""
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path("adapters"), allow_not_found=True))
        entries = []
        for info in sorted(infos, key=lambda i: i.base_name):
            if info.type != pyarrow.fs.FileType.Directory or not _NAME.fullmatch(info.base_name):
                continue
            manifest = self._read_json(f"{info.path}/{MANIFEST}")
            if manifest is not None:
                entries.append(Entry(info.base_name, self._uri(info.base_name), manifest))
        return entries

    def get(self, name: str) -> Entry:
        """The adapter called ``name``; an unknown name is an error that lists the known ones."""
        entry = self.find(name)
        if entry is None:
            known = [e.name for e in self.list()]
            listing = f"known: {', '.join(known)}" if known else f"the registry {self.location} is empty"
            raise RegistryError(f"no adapter named {name!r} in {self.location} ({listing}); {LIST_HINT}")
        return entry

    def find(self, name: str) -> Entry | None:
        """The adapter called ``name``, or None; reads that adapter's manifest only."""
        manifest = self._read_json(f"{self._adapter_path(name)}/{MANIFEST}")
        return None if manifest is None else Entry(name, self._uri(name), manifest)

    def pointers(self) -> dict[str, dict[str, Any]]:
        """All ``best`` pointers, keyed by base-model key."""
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path("best"), allow_not_found=True))
        found = {}
        for info in sorted(infos, key=lambda i: i.base_name):
            is_pointer = info.type == pyarrow.fs.FileType.File and info.base_name.endswith(".json")
            if is_pointer and not info.base_name.startswith(".") and (pointer := self._read_json(info.path)):
                found[info.base_name.removesuffix(".json")] = pointer
        return found

    def best(self, base_model: str | None = None) -> Entry | None:
        """The best adapter for ``base_model``; with None, that of the only base model the registry holds."""
        if base_model is not None:
            pointer = self._read_json(self._pointer_path(base_model))
            return None if pointer is None else self.get(pointer["name"])
        pointers = self.pointers()
        if len(pointers) > 1:
            bases = ", ".join(p.get("base_model", key) for key, p in pointers.items())
            raise RegistryError(
                f"registry {self.location} has best adapters for {len(pointers)} base models ({bases}); "
                "choose one: best(base_model=...) or --base MODEL"
            )
        return self.get(next(iter(pointers.values()))["name"]) if pointers else None

    def location_of(self, name: str) -> str:
        """Where adapter ``name`` lives (or will live once registered): a path or a URI."""
        return self._uri(validate_name(name))

    # Writing

    def register(
        self,
        name: str,
        source_dir: str | Path,
        manifest: dict[str, Any],
        *,
        metric: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        overwrite: bool = False,
    ) -> Entry:
        """Copy the local adapter directory ``source_dir`` in as ``name`` and move the ``best`` pointer.

        The pointer of ``manifest["base_model"]`` moves here when there is none yet or this adapter's
        ``manifest["metrics"][metric]`` is better (per ``mode``) than the pointer's value.

        Raises:
            RegistryError: a bad name or manifest, a missing source, or an existing name without overwrite.
        """
        target = self._adapter_path(name)
        source = Path(source_dir)
        if not (source / "adapter_config.json").is_file():
            raise RegistryError(f"{source} is not a PEFT adapter directory (no adapter_config.json); pass the adapter")
        base = manifest.get("base_model")
        if not isinstance(base, str) or not base:
            raise RegistryError(f"the manifest of {name!r} needs base_model (a string); build it with manifest_for()")
        _check_mode(mode)
        pointer = self._read_json(self._pointer_path(base))
        if pointer is not None and (pointer["metric"], pointer["mode"]) != (metric, mode):
            raise RegistryError(
                f"the best pointer of {base} ranks by {pointer['metric']} ({pointer['mode']}), not {metric} ({mode}): "
                f"register with metric={pointer['metric']!r}, mode={pointer['mode']!r}, or re-rank with set_best()"
            )
        exists = self.fs.get_file_info(f"{target}/{MANIFEST}").type == pyarrow.fs.FileType.File
        if exists and not overwrite:
            raise RegistryError(
                f"adapter {name!r} already exists in {self.location}: choose another name or pass overwrite=True"
            )
        manifest = {**manifest, "name": name, "created": manifest.get("created") or _now()}
        self._write_adapter(name, source, manifest)
        entry = Entry(name, self._uri(name), manifest)
        if pointer is not None and pointer["name"] == name:
            self._rerank(base, metric, mode)  # its own value changed: another entry may now be better
        elif _better(metric_of(manifest, metric), pointer, mode):
            self._write_pointer(entry, metric, mode)
        return entry

    def set_best(self, name: str, metric: str = "val_loss", mode: Literal["min", "max"] = "min") -> Entry:
        """Point the ``best`` pointer of ``name``'s base model at it, whatever the others score."""
        _check_mode(mode)
        entry = self.get(name)
        if metric_of(entry.manifest, metric) is None:
            raise RegistryError(f"adapter {name!r} has no numeric metric {metric!r}; it has: {_metric_names(entry)}")
        self._write_pointer(entry, metric, mode)
        return entry

    def local_dir(self, name: str, cache_dir: str | Path) -> str:
        """A local directory holding adapter ``name``, e.g. for ``PeftModel.from_pretrained``.

        A plain-path registry already is local. A URI registry is downloaded once into ``cache_dir/<name>``;
        the copy is reused while its manifest matches the registry's (an overwritten adapter is fetched again).
        """
        entry = self.get(name)
        if not self.is_uri:
            return entry.uri
        cache = Path(cache_dir)
        target = cache / name
        if (target / MANIFEST).is_file() and json.loads((target / MANIFEST).read_text()) == entry.manifest:
            return str(target)
        cache.mkdir(parents=True, exist_ok=True)
        staging = cache / f".download-{name}-{uuid.uuid4().hex[:8]}"
        pyarrow.fs.copy_files(
            self._adapter_path(name),
            str(staging),
            source_filesystem=self.fs,
            destination_filesystem=pyarrow.fs.LocalFileSystem(),
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        return str(target)

    def write_file(self, name: str, filename: str, text: str) -> str:
        """Write ``filename`` (a plain name, e.g. eval.json) beside adapter ``name``; returns its location."""
        self.get(name)  # the adapter must exist
        if "/" in filename or filename.startswith(".") or filename == MANIFEST:
            raise RegistryError(f"cannot write {filename!r} beside an adapter: use a plain file name, not the manifest")
        path = f"{self._adapter_path(name)}/{filename}"
        staging = f"{self._adapter_path(name)}/.{filename}.{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(staging) as out:
            out.write(text.encode())
        self.fs.move(staging, path)
        return path if not self.is_uri else f"{self._uri(name)}/{filename}"

    # Internals

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _uri(self, name: str) -> str:
        if self.is_uri:
            return f"{self.location.rstrip('/')}/adapters/{name}"
        return self._path("adapters", name)

    def _adapter_path(self, name: str) -> str:
        path = self._path("adapters", validate_name(name))
        if isinstance(self.fs, pyarrow.fs.LocalFileSystem):
            # Defence in depth: a symlink planted under adapters/ must not lead outside the registry.
            root = Path(self.root).resolve()
            if not Path(path).resolve().is_relative_to(root):
                raise RegistryError(f"adapter {name!r} resolves outside the registry root {root}; remove that link")
        return path

    def _pointer_path(self, base_model: str) -> str:
        return self._path("best", f"{base_key(base_model)}.json")

    def _read_json(self, path: str) -> dict[str, Any] | None:
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            try:
                return json.loads(stream.read())
            except json.JSONDecodeError as err:
                raise RegistryError(
                    f"{path} in registry {self.location} is not valid JSON ({err}); fix or remove it"
                ) from None

    def _write_json(self, path: str, data: dict[str, Any]) -> None:
        # Written beside, then moved: readers never see a half-written pointer or manifest.
        write_bytes_atomic(self.fs, path, json.dumps(data, indent=2).encode() + b"\n")

    def _write_adapter(self, name: str, source: Path, manifest: dict[str, Any]) -> None:
        target = self._adapter_path(name)
        if not self._renames:
            if self.fs.get_file_info(target).type != pyarrow.fs.FileType.NotFound:
                if self.fs.get_file_info(f"{target}/{MANIFEST}").type == pyarrow.fs.FileType.File:
                    self.fs.delete_file(f"{target}/{MANIFEST}")  # unlisted first, then replaced
                self.fs.delete_dir(target)
            self._write_tree(target, source, manifest)
            return
        staging = self._path("adapters", f".staging-{name}-{uuid.uuid4().hex[:8]}")
        self._write_tree(staging, source, manifest)
        replaced = None
        if self.fs.get_file_info(target).type != pyarrow.fs.FileType.NotFound:
            replaced = self._path("adapters", f".replaced-{name}-{uuid.uuid4().hex[:8]}")
            self.fs.move(target, replaced)
        self.fs.move(staging, target)
        if replaced is not None:
            self.fs.delete_dir(replaced)

    def _write_tree(self, destination: str, source: Path, manifest: dict[str, Any]) -> None:
        """Copy the adapter files, then the manifest: the manifest's presence means "complete"."""
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = file.relative_to(source).as_posix()
            if relative == MANIFEST:
                continue  # ours replaces any manifest the source carried
            path = f"{destination}/{relative}"
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            with file.open("rb") as src, self.fs.open_output_stream(path) as out:
                shutil.copyfileobj(src, out, length=8 << 20)
        self._write_json(f"{destination}/{MANIFEST}", manifest)

    def _write_pointer(self, entry: Entry, metric: str, mode: str) -> None:
        base = entry.manifest["base_model"]
        pointer = {
            "name": entry.name,
            "metric": metric,
            "value": metric_of(entry.manifest, metric),
            "mode": mode,
            "updated": _now(),
            "base_model": base,
        }
        self._write_json(self._pointer_path(base), pointer)

    def _rerank(self, base_model: str, metric: str, mode: str) -> None:
        scored = [
            (value, e)
            for e in self.list()
            if e.manifest.get("base_model") == base_model and (value := metric_of(e.manifest, metric)) is not None
        ]
        if scored:
            pick = min if mode == "min" else max
            self._write_pointer(pick(scored, key=lambda pair: pair[0])[1], metric, mode)


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise RegistryError(f"mode must be 'min' or 'max', got {mode!r}")


def metric_of(manifest: dict[str, Any], metric: str) -> float | None:
    value = (manifest.get("metrics") or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        return None
    return float(value)


def _metric_names(entry: Entry) -> str:
    return ", ".join(sorted(entry.manifest.get("metrics") or {})) or "(none)"


def _better(value: float | None, pointer: dict[str, Any] | None, mode: str) -> bool:
    """Whether ``value`` should take the pointer; ties keep the incumbent."""
    if value is None:
        return False
    if pointer is None or pointer.get("value") is None:
        return True
    return value < pointer["value"] if mode == "min" else value > pointer["value"]


def manifest_for(
    cfg: Config, metrics: dict[str, Any], *, data_fingerprint: str, rows: dict[str, int], source: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of an adapter trained with ``cfg``: what Serve and evaluation need to trust and reuse it.

    Non-numeric metric values (Ray adds bookkeeping strings to reported results) are left out.
    """
    train = cfg.train
    return {
        "base_model": cfg.model.name_or_path,
        "quantization": cfg.model.quantization,
        "lora": {
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "target_modules": cfg.lora.target_modules,
        },
        "training": {
            "lr": train.lr,
            "epochs": train.epochs,
            "max_steps": train.max_steps,
            "batch_size": train.batch_size,
            "grad_accum": train.grad_accum,
            "num_workers": train.num_workers,
            "max_seq_len": train.max_seq_len,
            "optimizer": train.optimizer,
            "lr_scheduler": train.lr_scheduler,
            "warmup_ratio": train.warmup_ratio,
            "weight_decay": train.weight_decay,
            "max_grad_norm": train.max_grad_norm,
            "seed": train.seed,
        },
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)},
        "dataset": {**dataset_entry(cfg.data.path, cfg.data.format, data_fingerprint), "rows": rows},
        "source": source,
        "created": _now(),
        "project_version": _project_version(),
    }


def _project_version() -> str:
    try:
        return importlib.metadata.version("qlora-ray")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def dataset_entry(path: str, fmt: str, fingerprint: str | None = None) -> dict[str, str]:
    """The manifest's ``dataset`` entry: the data's path as training read it, its format and fingerprint
    (Serve's grounding finds an adapter's Q&A set through it)."""
    return {"path": path, "format": fmt, "fingerprint": fingerprint or dataset_fingerprint(path)}


def saved_data_config(directory: str | Path) -> DataConfig | None:
    """The data settings an adapter was trained with, from the run config saved beside it (``ADAPTER_CONFIG``).

    None for a plain PEFT adapter, which has no such file. Only the data section is read: an adapter saved by
    an older version, whose other settings the schema no longer knows, still serves with its prompts and data.
    """
    saved = Path(directory) / ADAPTER_CONFIG
    if not saved.is_file():
        return None
    try:
        return DataConfig.model_validate((yaml.safe_load(saved.read_text()) or {}).get("data") or {})
    except (yaml.YAMLError, ValidationError) as err:
        problem = f"its data section does not validate ({err}); fix or remove that file"
        raise ConfigError(str(saved), [problem]) from None


def dataset_fingerprint(path: str) -> str:
    """``sha256:<hex>`` of a data file, or of a directory's sorted relative names and bytes.

    A path that does not exist here (a hub dataset name) is fingerprinted by name only: ``name:<path>``.
    """
    location = Path(path)
    if location.is_file():
        files = [(location.name, location)]
    elif location.is_dir():
        files = sorted((p.relative_to(location).as_posix(), p) for p in location.rglob("*") if p.is_file())
    else:
        return f"name:{path}"
    digest = hashlib.sha256()
    for relative, file in files:
        if location.is_dir():  # names matter in a directory (length-prefixed, so no two layouts collide)
            digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
