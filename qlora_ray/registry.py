"""The adapter registry: named PEFT adapters with manifests, and a ``best`` pointer per base model.

The sweep writes it; evaluation and Serve read it. A registry is a local directory or a pyarrow filesystem
URI (``file:///...``, ``s3://...``, ``gs://...``), and every read and write goes through ``pyarrow.fs`` so both
behave the same::

    <registry>/adapters/<name>/manifest.json    the manifest: its "revision" names the directory of the files
    <registry>/revisions/<name>/<revision>/     the files: a plain PEFT adapter directory, plus a copy of the manifest
    <registry>/best/<base-key>.json             {"name", "metric", "value", "mode", "updated", "base_model"}
    <registry>/.lock                            local registries only: writers hold it (fcntl.flock)

An adapter is listed once ``adapters/<name>/manifest.json`` exists. A manifest without "revision" (written before
revisions existed) has its files beside it. ``Entry.uri`` is the directory of the files.

What writers guarantee (for a writer process that is killed; no fsync is done, so a machine that loses power
may lose the last write):

- Atomic writes. A registration uploads the files to a fresh revision directory, then writes the manifest that
  points at it, then deletes the revision (or the pre-revision files) it replaced. A manifest or pointer is
  written under a staging name beside it and moved into place (a rename locally, a whole new object on an object
  store). So a reader finds an adapter's old version or its new one, never a mix and never neither, and a
  writer killed at any point leaves one of the two (a first registration killed early leaves no adapter). One
  killed after its manifest but before the pointer leaves the pointer where it was until the next registration.
- Cleanup. What a killed writer left (unreferenced revisions, staging files) is deleted by the next write of
  that adapter or pointer: at once on a local registry, whose writers take the lock; on an object store once it
  is older than ``qlora_ray.storage.STALE_AFTER_S`` (an hour), as it could be a live writer's upload.
- The best pointer is recomputed from every manifest of its base model after each registration: the adapter
  with the best value of the pointer's metric wins, a tie keeps the incumbent. Locally the whole registration
  holds the lock (``<registry>/.lock``), so concurrent writers run one after the other. An object store has no
  locks: there a writer, after writing the pointer, reads it back and re-ranks from the manifests until the two
  agree (at most SETTLE_ROUNDS times), so the pointer ends at the best adapter whichever writer finishes last.
  Two registrations of one name at once on an object store: the later manifest wins. ``set_best`` pins an
  adapter until the next registration for that base model re-ranks.
- Readers take no lock. A reader that resolved an adapter just before it was overwritten may find the old
  revision deleted; ``local_dir`` then resolves it again.

A damaged registry degrades: an unreadable manifest, or one whose files are missing, is left out of
``list()`` with a warning; ``get`` of that name raises :class:`RegistryError` naming the damage. A best pointer
to a missing or damaged adapter falls back to the best remaining adapter by the pointer's metric (a warning
says so); an unreadable pointer ranks by val_loss (min). Error messages name no paths (Serve shows them to
clients); the warnings in the log do.

From the shell: ``qlora-ray artifacts list|show|best`` (``jobs/artifacts.py``).

Nothing heavy is imported here (no torch, transformers or Ray): Serve ingress processes import this module.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs
import yaml
from pydantic import ValidationError

from qlora_ray.config import Config, ConfigError, DataConfig
from qlora_ray.errors import QloraRayError
from qlora_ray.storage import (
    StorageError,
    age_of,
    filesystem_of,
    fresh_name,
    is_stale,
    is_uri,
    remove_leftovers,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
ADAPTER_CONFIG = "qlora_ray_config.yaml"  # the run config saved beside a trained adapter
NAME_RULE = "1-128 letters, digits, '-', '_' or '.', starting with a letter or digit, and no '..'"
NAME_EXAMPLE = "phi2-faq-r16-lr2e-4"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_REVISION = re.compile(r"r-\d{8}T\d{6}Z-[0-9a-f]{8}")  # storage.fresh_name("r-")
# A hub id such as "microsoft/phi-2" or "gpt2": at most one slash, no path tricks.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
LIST_HINT = "list the registry with: qlora-ray artifacts list"
DEFAULT_RANKING = ("val_loss", "min")  # what an unreadable best pointer falls back to
SETTLE_ROUNDS = 5  # object stores: write-and-check rounds of the best pointer


class RegistryError(QloraRayError, ValueError):
    """A registry operation that cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class Entry:
    """One registered adapter: ``uri`` is the directory of its files, as a path (local registry) or a URI."""

    name: str
    uri: str
    manifest: dict[str, Any] = field(hash=False)


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter name, else raise :class:`RegistryError`.

    Names become path components, so anything that could climb out of ``adapters/`` (``..``, ``/``) or hide
    (a leading ``.``, which staging files use) is refused before it touches a path.
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
    """Named adapters under one location; see the module docstring for the layout and the guarantees."""

    def __init__(self, location: str):
        if not location:
            raise RegistryError("the registry location is empty: give a directory or a URI (s3://bucket/registry)")
        self.location = location
        self.is_uri = is_uri(location)
        try:
            self.fs, self.root = filesystem_of(location)
        except StorageError as err:
            raise RegistryError(f"cannot open registry: {err}") from None
        # A local filesystem can be locked; an object store cannot, and another writer may be busy in it.
        self._local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)
        self._reserved: dict[str, str] = {}  # name -> the revision location_of promised to the next register

    def __repr__(self) -> str:
        return f"Registry({self.location!r})"

    # Reading

    def list(self) -> list[Entry]:
        """Every complete adapter, sorted by name; damaged ones are left out with a warning."""
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path("adapters"), allow_not_found=True))
        entries = []
        for info in sorted(infos, key=lambda i: i.base_name):
            if info.type != pyarrow.fs.FileType.Directory or not _NAME.fullmatch(info.base_name):
                continue
            with contextlib.suppress(RegistryError):  # damaged: _load logged it
                if (entry := self._load(info.base_name)) is not None:
                    entries.append(entry)
        return entries

    def get(self, name: str) -> Entry:
        """The adapter called ``name``; an unknown or damaged one is a :class:`RegistryError` naming no paths."""
        entry = self.find(name)
        if entry is None:
            raise RegistryError(f"no adapter named {name!r} is registered; {LIST_HINT}")
        return entry

    def find(self, name: str) -> Entry | None:
        """The adapter called ``name``, None when there is none; raises :class:`RegistryError` when damaged."""
        return self._load(name)

    def pointers(self) -> dict[str, dict[str, Any]]:
        """All readable ``best`` pointers, keyed by base-model key (an unreadable one is logged and left out)."""
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path("best"), allow_not_found=True))
        found = {}
        for info in sorted(infos, key=lambda i: i.base_name):
            is_pointer = info.type == pyarrow.fs.FileType.File and info.base_name.endswith(".json")
            if is_pointer and not info.base_name.startswith(".") and (pointer := self._read_pointer(info.path)):
                found[info.base_name.removesuffix(".json")] = pointer
        return found

    def best(self, base_model: str | None = None) -> Entry | None:
        """The best adapter for ``base_model``; with None, that of the only base model the registry holds.

        A pointer to a missing or damaged adapter falls back to the best remaining one (logged).
        """
        if base_model is None:
            pointers = self.pointers()
            if len(pointers) > 1:
                bases = ", ".join(p["base_model"] for p in pointers.values())
                raise RegistryError(
                    f"the registry has best adapters for {len(pointers)} base models ({bases}); "
                    "choose one: best(base_model=...) or --base MODEL"
                )
            if not pointers:
                return None
            pointer = next(iter(pointers.values()))
            base_model = pointer["base_model"]
        else:
            path = self._pointer_path(base_model)
            if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
                return None
            pointer = self._read_pointer(path)
        if pointer is not None:
            with contextlib.suppress(RegistryError):  # damaged: _load logged it
                if (entry := self._load(pointer["name"])) is not None:
                    return entry
        metric, mode = (pointer["metric"], pointer["mode"]) if pointer else DEFAULT_RANKING
        fallback = self._rank(base_model, metric, mode)
        log.warning(
            "registry %s: the best pointer of %s %s; using the best remaining adapter by %s (%s): %s",
            self.location, base_model,
            f"names adapter {pointer['name']!r}, which is missing or damaged" if pointer else "cannot be read",
            metric, mode, fallback.name if fallback else "none",
        )  # fmt: skip
        return fallback

    def location_of(self, name: str) -> str:
        """Where the next ``register(name, ...)`` through this object puts the adapter's files: a path or a URI.

        The revision is chosen here and kept for that registration, so files written before it (a model card)
        can name their own home.
        """
        return self._uri(*_files(name, self._reserved.setdefault(validate_name(name), fresh_name("r-"))))

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
        """Copy the local adapter directory ``source_dir`` in as ``name`` and re-rank the ``best`` pointer.

        The pointer of ``manifest["base_model"]`` then names the adapter with the best
        ``manifest["metrics"][metric]`` (per ``mode``) among all registered for that base model.

        Raises:
            RegistryError: a bad name or manifest, a missing source, or an existing name without overwrite.
        """
        home = self._inside("adapters", validate_name(name))
        source = Path(source_dir)
        if not (source / "adapter_config.json").is_file():
            raise RegistryError(f"{source} is not a PEFT adapter directory (no adapter_config.json); pass the adapter")
        base = manifest.get("base_model")
        if not isinstance(base, str) or not base:
            raise RegistryError(f"the manifest of {name!r} needs base_model (a string); build it with manifest_for()")
        _check_mode(mode)
        with self._writing():
            pointer = self._read_pointer(self._pointer_path(base))
            if pointer is not None and (pointer["metric"], pointer["mode"]) != (metric, mode):
                raise RegistryError(
                    f"the best pointer of {base} ranks by {pointer['metric']} ({pointer['mode']}), not {metric} "
                    f"({mode}): register with metric={pointer['metric']!r}, mode={pointer['mode']!r}, or re-rank "
                    "with set_best()"
                )
            try:
                old = self._read_json(f"{home}/{MANIFEST}")
            except ValueError:
                old = {}  # damaged: replaced all the same
            if old is not None and not overwrite:
                raise RegistryError(
                    f"adapter {name!r} already exists in {self.location}: choose another name or pass overwrite=True"
                )
            revision = self._reserved.pop(name, None) or fresh_name("r-")
            manifest = {**manifest, "name": name, "created": manifest.get("created") or _now(), "revision": revision}
            self._write_tree(self._inside(*_files(name, revision)), source, manifest)
            self._write_json(f"{home}/{MANIFEST}", manifest)  # the switch: readers now find this revision
            replaced = old.get("revision") if isinstance(old, dict) else None
            self._clean(name, keep=revision, replaced=replaced)
            self._settle_pointer(base, metric, mode)
        return Entry(name, self._uri(*_files(name, revision)), manifest)

    def set_best(self, name: str, metric: str = "val_loss", mode: Literal["min", "max"] = "min") -> Entry:
        """Point the ``best`` pointer of ``name``'s base model at it, whatever the others score.

        It holds until the next registration for that base model re-ranks the pointer.
        """
        _check_mode(mode)
        validate_name(name)
        with self._writing():
            entry = self.get(name)
            if metric_of(entry.manifest, metric) is None:
                raise RegistryError(
                    f"adapter {name!r} has no numeric metric {metric!r}; it has: {_metric_names(entry)}"
                )
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
        target = Path(cache_dir) / name
        try:
            if json.loads((target / MANIFEST).read_text()) == entry.manifest:
                return str(target)
        except (OSError, ValueError):
            pass  # no copy yet, or an unreadable one: fetch it
        try:
            return self._download(entry, target)
        except OSError as err:
            latest = self.get(name)  # overwritten while it was fetched? its old revision went: fetch the new one
            if latest.manifest == entry.manifest:
                raise self._fetch_failed(name, target, err) from None
        try:
            return self._download(latest, target)
        except OSError as err:
            raise self._fetch_failed(name, target, err) from None

    def write_file(self, name: str, filename: str, text: str) -> str:
        """Write ``filename`` (a plain name, e.g. eval.json) beside adapter ``name``'s files; returns its location."""
        if "/" in filename or filename.startswith(".") or filename == MANIFEST:
            raise RegistryError(f"cannot write {filename!r} beside an adapter: use a plain file name, not the manifest")
        validate_name(name)
        with self._writing():
            entry = self.get(name)  # the adapter must exist
            directory = self._inside(*_files(name, entry.manifest.get("revision")))
            write_bytes_atomic(self.fs, f"{directory}/{filename}", text.encode(), sole_writer=self._local)
        return f"{entry.uri}/{filename}"

    # Internals

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _uri(self, *parts: str) -> str:
        return "/".join([self.location.rstrip("/"), *parts]) if self.is_uri else self._path(*parts)

    def _inside(self, kind: str, name: str, *rest: str) -> str:
        """The path of ``<kind>/<name>/...`` (a validated name) under the root."""
        path = self._path(kind, name, *rest)
        if self._local:
            # Defence in depth: a symlink planted in the registry must not lead outside it.
            root = Path(self.root).resolve()
            if not Path(path).resolve().is_relative_to(root):
                log.warning("registry %s: %s/%s resolves outside the registry root %s", self.location, kind, name, root)
                raise RegistryError(f"adapter {name!r} resolves outside the registry root; remove that link")
        return path

    def _pointer_path(self, base_model: str) -> str:
        return self._path("best", f"{base_key(base_model)}.json")

    def _read_json(self, path: str) -> Any:
        """The parsed JSON at ``path``; None when there is no file; ValueError when it does not parse."""
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read())

    def _load(self, name: str) -> Entry | None:
        """Adapter ``name``: None when it has no manifest; :class:`RegistryError` (logged) when it is damaged."""
        home = self._inside("adapters", validate_name(name))
        try:
            manifest = self._read_json(f"{home}/{MANIFEST}")
        except ValueError as err:
            problem = f"its manifest is not valid JSON ({err})"
        else:
            if manifest is None:
                return None
            problem = _manifest_problem(manifest)
            if problem is None:
                config = f"{self._inside(*_files(name, manifest.get('revision')))}/adapter_config.json"
                if self.fs.get_file_info(config).type != pyarrow.fs.FileType.File:
                    problem = "its adapter files are missing"
        if problem is not None:
            log.warning("registry %s: adapter %r (%s) is damaged: %s", self.location, name, home, problem)
            raise RegistryError(
                f"adapter {name!r} is damaged: {problem}; register it again with overwrite, or remove it"
            )
        return Entry(name, self._uri(*_files(name, manifest.get("revision"))), manifest)

    def _read_pointer(self, path: str) -> dict[str, Any] | None:
        """The pointer at ``path``; None when there is none, or when it is unreadable (logged)."""
        try:
            pointer = self._read_json(path)
        except ValueError as err:
            pointer, problem = None, f"not valid JSON ({err})"
        else:
            problem = None if pointer is None or _valid_pointer(pointer) else "not a best pointer"
        if problem is not None:
            log.warning("registry %s: the best pointer %s is unreadable: %s", self.location, path, problem)
            return None
        return pointer

    def _write_json(self, path: str, data: dict[str, Any]) -> None:
        write_bytes_atomic(self.fs, path, json.dumps(data, indent=2).encode() + b"\n", sole_writer=self._local)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the registry's write lock: on a local filesystem one writer at a time; object stores have none."""
        if not self._local:
            yield
            return
        Path(self.root).mkdir(parents=True, exist_ok=True)
        with open(Path(self.root) / LOCK, "a") as lock:  # the lock goes with the file's closing
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write_tree(self, destination: str, source: Path, manifest: dict[str, Any]) -> None:
        """Copy the adapter files and a copy of the manifest into a revision directory no manifest names yet."""
        files = [(p.relative_to(source).as_posix(), p) for p in sorted(source.rglob("*")) if p.is_file()]
        for relative, file in files:
            if relative == MANIFEST:
                continue  # ours replaces any manifest the source carried
            path = f"{destination}/{relative}"
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            with file.open("rb") as src, self.fs.open_output_stream(path) as out:
                shutil.copyfileobj(src, out, length=8 << 20)
        with self.fs.open_output_stream(f"{destination}/{MANIFEST}") as out:
            out.write(json.dumps(manifest, indent=2).encode() + b"\n")

    def _clean(self, name: str, keep: str, replaced: str | None) -> None:
        """Delete what adapter ``name``'s manifest no longer names: the revision it replaced (or the files of a
        manifest without revisions) and what killed writers left. Under the lock all of it goes; on an object
        store a young revision or staging file may be another writer's, in progress, so only stale ones go."""
        for kind in ("adapters", "revisions"):
            directory = self._inside(kind, name)
            for info in self.fs.get_file_info(pyarrow.fs.FileSelector(directory, allow_not_found=True)):
                item = info.base_name
                if item in (MANIFEST, keep):
                    continue
                if self._local or item == replaced or age_of(item) is None or is_stale(item):
                    if info.type == pyarrow.fs.FileType.Directory:
                        self.fs.delete_dir(info.path)
                    else:
                        self.fs.delete_file(info.path)

    def _write_pointer(self, entry: Entry, metric: str, mode: str) -> None:
        pointer = {**_pointer_to(entry, metric, mode), "updated": _now()}
        self._write_json(self._pointer_path(entry.manifest["base_model"]), pointer)

    def _settle_pointer(self, base_model: str, metric: str, mode: str) -> None:
        """Point ``base_model``'s pointer at its best adapter, ranked from every manifest.

        Under the lock once is enough. On an object store a concurrent writer may have ranked before this
        adapter's manifest existed and write after: write, then read back and re-rank until they agree.
        """
        path = self._pointer_path(base_model)
        for _ in range(1 if self._local else SETTLE_ROUNDS):
            pointer = self._read_pointer(path)
            pick = self._rank(base_model, metric, mode, incumbent=pointer["name"] if pointer else None)
            if pick is None or pointer == {**(pointer or {}), **_pointer_to(pick, metric, mode)}:
                remove_leftovers(self.fs, path, sole_writer=self._local)  # what a killed writer left, if any
                return
            self._write_pointer(pick, metric, mode)
        if not self._local:
            log.warning("registry %s: the best pointer of %s kept changing; left to the other writers", self.location,
                        base_model)  # fmt: skip

    def _rank(self, base_model: str, metric: str, mode: str, incumbent: str | None = None) -> Entry | None:
        """The adapter of ``base_model`` with the best ``metric``; a tie keeps ``incumbent``, else the first name."""
        key = base_key(base_model)
        scored = [
            (value, e)
            for e in self.list()
            if base_key(e.manifest["base_model"]) == key and (value := metric_of(e.manifest, metric)) is not None
        ]
        if not scored:
            return None
        top = (min if mode == "min" else max)(value for value, _ in scored)
        tied = [e for value, e in scored if value == top]
        return next((e for e in tied if e.name == incumbent), tied[0])

    def _fetch_failed(self, name: str, target: Path, err: OSError) -> RegistryError:
        log.warning("registry %s: fetching adapter %r into %s failed: %s", self.location, name, target, err)
        return RegistryError(f"adapter {name!r} could not be fetched from the registry ({type(err).__name__})")

    def _download(self, entry: Entry, target: Path) -> str:
        """Copy ``entry``'s files to ``target`` through a staging directory beside it."""
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".download-{entry.name}-{uuid.uuid4().hex[:8]}"
        pyarrow.fs.copy_files(
            self._inside(*_files(entry.name, entry.manifest.get("revision"))),
            str(staging),
            source_filesystem=self.fs,
            destination_filesystem=pyarrow.fs.LocalFileSystem(),
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        return str(target)


def _files(name: str, revision: str | None) -> tuple[str, ...]:
    """Where adapter ``name``'s files are, under the root: its revision, or beside a manifest without one."""
    return ("revisions", name, revision) if revision else ("adapters", name)


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "its manifest is not a JSON object"
    if not isinstance(manifest.get("base_model"), str) or not manifest["base_model"]:
        return "its manifest has no base_model"
    revision = manifest.get("revision")
    if revision is not None and not (isinstance(revision, str) and _REVISION.fullmatch(revision)):
        return "its manifest names no valid revision"
    return None


def _valid_pointer(pointer: Any) -> bool:
    return (
        isinstance(pointer, dict)
        and all(isinstance(pointer.get(key), str) for key in ("name", "metric", "base_model"))
        and pointer.get("mode") in ("min", "max")
    )


def _pointer_to(entry: Entry, metric: str, mode: str) -> dict[str, Any]:
    """A best pointer's fields, but for the time it was written."""
    base, value = entry.manifest["base_model"], metric_of(entry.manifest, metric)
    return {"name": entry.name, "metric": metric, "value": value, "mode": mode, "base_model": base}


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
