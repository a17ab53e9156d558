"""The registry under failure: writers killed at every operation, concurrent writers, damaged entries.

A registration is killed (SIGKILL, in a forked process) at each of its filesystem operations in turn; after each
kill a fresh Registry must find the adapter whole at its old version or its new one, and the next write must
remove what the killed one left. fsspec's in-memory store (object-store semantics: no directory rename, no lock)
lives in this process only, so there the registration is stopped in-process instead, by an exception no handler
of the registry catches, at the same operation boundaries.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs
import pytest
from test_registry import PHI2, fake_adapter, files_of, manifest, write_unrevisioned

from jobs.pipeline import PipelineState
from qlora_ray import storage
from qlora_ray.registry import Registry, RegistryError

FORK = multiprocessing.get_context("fork")
OLD, NEW, OTHER = 1.0, 0.5, 0.8  # val_loss of adapter "a" before and after, and of adapter "other"


class Killed(BaseException):
    """Stops an in-process writer: a BaseException, so no ``except Exception`` on the way catches it."""


class FaultyFS:
    """A pyarrow filesystem whose ``at``-th operation (a method call, or a write to a stream it opened) never
    happens: the process SIGKILLs itself there (``kill``), or raises :class:`Killed`. ``at=0`` never fires;
    ``count`` is the number of operations so far."""

    def __init__(self, fs, at: int, kill: bool = True):
        self._fs, self._at, self._kill, self.count = fs, at, kill, 0

    def tick(self) -> None:
        self.count += 1
        if self.count == self._at:
            if self._kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Killed

    def __getattr__(self, attr):
        method = getattr(self._fs, attr)

        def call(*args, **kwargs):
            self.tick()
            result = method(*args, **kwargs)
            return _CountedStream(result, self) if attr == "open_output_stream" else result

        return call


class _CountedStream:
    def __init__(self, stream, fs: FaultyFS):
        self._stream, self._fs = stream, fs

    def write(self, data):
        self._fs.tick()
        return self._stream.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()


def forked(target, *args) -> int:
    """Run ``target(*args)`` in a forked process; its exit code (-9 when it was SIGKILLed)."""
    process = FORK.Process(target=target, args=args)
    process.start()
    process.join(60)
    if process.exitcode is None:
        process.kill()
        pytest.fail("the child hung")
    return process.exitcode


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    root = tmp_path / "sources"
    return {tag: fake_adapter(root, tag) for tag in ("old", "new", "other", "again")}


def template(root: Path, sources: dict[str, Path], layout: str) -> None:
    """A registry with adapter "other" (the best so far) and, unless ``layout`` is "first", adapter "a" at its
    old version: registered ("revision"), or as registries wrote it before revisions ("unrevisioned")."""
    registry = Registry(str(root))
    registry.register("other", sources["other"], manifest(OTHER))
    if layout == "revision":
        registry.register("a", sources["old"], manifest(OLD))
    elif layout == "unrevisioned":
        write_unrevisioned(root, "a", sources["old"], manifest(OLD))


def register_new(location: str, at: int, source: Path, count_file: Path | None, kill: bool = True) -> None:
    """Overwrite adapter "a" with its new version, through a filesystem that fails at operation ``at``."""
    registry = Registry(location)
    registry.fs = FaultyFS(registry.fs, at, kill)
    try:
        registry.register("a", source, manifest(NEW), overwrite=True)
    finally:
        if count_file is not None:
            count_file.write_text(str(registry.fs.count))


def check_old_or_new(location: str, sources: dict[str, Path], cache: Path, first: bool) -> str | None:
    """A fresh Registry finds "a" whole at its old version or its new one (or, for a first registration, not
    at all): the same files as that version's source, and the manifest that goes with them."""
    registry = Registry(location)
    entry = registry.find("a")
    if entry is None:
        assert first, "the adapter vanished"
        assert [e.name for e in registry.list()] == ["other"]
        with pytest.raises(RegistryError, match="is registered"):
            registry.get("a")
        version = None
    else:
        assert [e.name for e in registry.list()] == ["a", "other"]
        files = files_of(Path(registry.local_dir("a", cache)))
        stored = files.pop("manifest.json", None)
        # An unrevisioned adapter's directory also holds the staging file of the manifest that replaces it.
        files = {path: data for path, data in files.items() if not path.startswith(".manifest.json.")}
        version = next((v for v in ("old", "new") if files == files_of(sources[v])), None)
        assert version is not None, f"a mix or a half: {sorted(files)}"
        assert version != "old" or not first
        assert entry.manifest["metrics"]["val_loss"] == (OLD if version == "old" else NEW)
        assert stored is None or json.loads(stored) == entry.manifest  # the files' copy of the manifest agrees
    best = registry.best(PHI2)
    assert best.name == "other" or (best.name == "a" and version == "new")
    return version


def assert_clean(root: Path, names: set[str]) -> None:
    """Only what the manifests name is left: no staging file, no unreferenced revision."""
    registry = Registry(str(root))
    expected = {".lock", "best/microsoft--phi-2.json"}
    for name in names:
        entry = registry.get(name)
        expected.add(f"adapters/{name}/manifest.json")
        revision = Path(entry.uri).relative_to(root).as_posix()
        expected |= {f"{revision}/{file}" for file in files_of(Path(entry.uri))}
    assert set(files_of(root)) == expected
    assert {p.name for p in (root / "revisions").iterdir()} == names  # no directory of a killed first registration


LOCAL_CASES = [("path", "revision"), ("path", "unrevisioned"), ("path", "first"), ("file-uri", "revision")]


@pytest.mark.parametrize(("kind", "layout"), LOCAL_CASES)
def test_a_registration_killed_at_any_operation_leaves_the_old_version_or_the_new(tmp_path, sources, kind, layout):
    blank = tmp_path / "template"
    template(blank, sources, layout)
    count_file = tmp_path / "count"
    trial = tmp_path / "trial"
    shutil.copytree(blank, trial)
    location = str(trial) if kind == "path" else trial.as_uri()
    assert forked(register_new, location, 0, sources["new"], count_file) == 0
    operations = int(count_file.read_text())
    assert operations > 10
    seen = set()
    for at in range(1, operations + 1):
        root = tmp_path / f"killed-{at}"
        shutil.copytree(blank, root)
        location = str(root) if kind == "path" else root.as_uri()
        assert forked(register_new, location, at, sources["new"], None) == -signal.SIGKILL, f"not killed at {at}"
        seen.add(check_old_or_new(location, sources, tmp_path / f"cache-{at}", first=layout == "first"))
        # The next write takes the place of the killed one and removes what it left.
        Registry(location).register("a", sources["again"], manifest(0.9), overwrite=True)
        assert_clean(root, {"a", "other"})
        shutil.rmtree(root)
    assert seen == {"new", None if layout == "first" else "old"}  # the kills fell before and after the switch


def test_an_object_store_registration_stopped_at_any_operation_leaves_the_old_version_or_the_new(
    tmp_path, sources, memory_location, monkeypatch
):
    def prepare(at: int) -> str:
        location = f"{memory_location}/trial-{at}"
        Registry(location).register("other", sources["other"], manifest(OTHER))
        Registry(location).register("a", sources["old"], manifest(OLD))
        return location

    count_file = tmp_path / "count"
    register_new(prepare(0), 0, sources["new"], count_file, kill=False)
    operations = int(count_file.read_text())
    seen = set()
    for at in range(1, operations + 1):
        location = prepare(at)
        with pytest.raises(Killed):
            register_new(location, at, sources["new"], None, kill=False)
        seen.add(check_old_or_new(location, sources, tmp_path / f"cache-{at}", first=False))
        # No lock tells a killed writer's leftovers from a live one's upload: only stale ones are removed.
        with monkeypatch.context() as patch:
            patch.setattr(storage, "STALE_AFTER_S", -1.0)
            Registry(location).register("a", sources["again"], manifest(0.9), overwrite=True)
        registry = Registry(location)
        fs, root = registry.fs, registry.root
        left = {i.path.removeprefix(root) for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))}
        expected = {"/adapters", "/best", "/best/microsoft--phi-2.json", "/revisions"}
        for entry in registry.list():
            revision = entry.uri.removeprefix(location)
            expected |= {f"/adapters/{entry.name}", f"/adapters/{entry.name}/manifest.json"}
            expected |= {f"/revisions/{entry.name}", revision, f"{revision}/sub", f"{revision}/manifest.json"}
            expected |= {
                f"{revision}/{f}" for f in ("adapter_config.json", "adapter_model.safetensors", "sub/tokenizer.json")
            }
        assert left == expected, f"stopped at {at}"
    assert seen == {"old", "new"}


def test_on_an_object_store_a_young_leftover_may_be_a_live_upload_and_stays(tmp_path, memory_location):
    registry = Registry(memory_location)
    registry.register("a", fake_adapter(tmp_path, "1"), manifest(1.0))
    revisions = f"{registry.root}/revisions/a"
    young, stale = storage.fresh_name("r-"), "r-20000101T000000Z-0123abcd"
    for revision in (young, stale):
        with registry.fs.open_output_stream(f"{revisions}/{revision}/adapter_config.json") as out:
            out.write(b"{}")
    entry = registry.register("a", fake_adapter(tmp_path, "2"), manifest(0.9), overwrite=True)
    left = {i.base_name for i in registry.fs.get_file_info(pyarrow.fs.FileSelector(revisions))}
    assert left == {young, entry.manifest["revision"]}


def write_state(location: str, at: int, finished: dict, count_file: Path | None) -> None:
    """Save a pipeline state at ``location`` through a filesystem that kills this process at operation ``at``."""
    faulty = None

    def filesystem_of(where):
        nonlocal faulty
        fs, path = pyarrow.fs.LocalFileSystem(), str(Path(where).resolve())
        faulty = FaultyFS(fs, at)
        return faulty, path

    storage.filesystem_of = filesystem_of  # this forked child's own copy of the module
    PipelineState(location, {"lora": {"r": 8}}, dict(finished)).done("evaluate", {"path": "eval.json"})
    if count_file is not None:
        count_file.write_text(str(faulty.count))


def test_a_pipeline_state_write_killed_at_any_operation_leaves_the_old_file_or_the_new(tmp_path):
    location = str(tmp_path / "run.pipeline.json")
    old = {"train": {"adapter": "a"}}
    old_text = json.dumps({"config": {"lora": {"r": 8}}, "finished": old}, indent=2)
    new = json.loads(old_text)
    new["finished"]["evaluate"] = {"path": "eval.json"}
    count_file = tmp_path / "count"
    Path(location).write_text(old_text)
    assert forked(write_state, location, 0, old, count_file) == 0
    assert json.loads(Path(location).read_text()) == new
    operations = int(count_file.read_text())
    for at in range(1, operations + 1):
        Path(location).write_text(old_text)
        assert forked(write_state, location, at, old, None) == -signal.SIGKILL
        assert json.loads(Path(location).read_text()) == json.loads(old_text)  # the move is the last operation
        PipelineState(location, {"lora": {"r": 8}}, dict(old)).done("train", {"adapter": "b"})  # the next write
        assert sorted(p.name for p in tmp_path.iterdir()) == ["count", "run.pipeline.json"]  # no staging file


# Concurrent writers


class PauseBeforePointer:
    """A filesystem that, the first time the best pointer is written, waits for ``go`` (a threading.Event, or a
    file to appear) and says so first (``paused``: an Event, or a file it creates)."""

    def __init__(self, fs, paused, go):
        self._fs, self._paused, self._go, self._done = fs, paused, go, False

    def __getattr__(self, attr):
        method = getattr(self._fs, attr)
        if attr != "open_output_stream":
            return method

        def open_output_stream(path, *args, **kwargs):
            if "/best/" in path and not self._done:
                self._done = True
                if isinstance(self._paused, Path):
                    self._paused.touch()
                    deadline = time.monotonic() + 30
                    while not self._go.exists() and time.monotonic() < deadline:
                        time.sleep(0.01)
                else:
                    self._paused.set()
                    self._go.wait(30)
            return method(path, *args, **kwargs)

        return open_output_stream


def register_paused(location: str, name: str, source: Path, value: float, paused, go) -> None:
    registry = Registry(location)
    registry.fs = PauseBeforePointer(registry.fs, paused, go)
    registry.register(name, source, manifest(value))


def register_plain(location: str, name: str, source: Path, value: float) -> None:
    Registry(location).register(name, source, manifest(value))


def test_the_better_adapter_stays_best_when_a_worse_one_finishes_its_pointer_last(tmp_path, sources):
    # The worse registration ranks first and stops just before writing the pointer; the better one runs
    # meanwhile. Without the lock the worse one then writes a pointer ranked on what it read before.
    location = str(tmp_path / "registry")
    Registry(location).register("baseline", sources["old"], manifest(1.0))
    paused, go = tmp_path / "paused", tmp_path / "go"
    worse = FORK.Process(target=register_paused, args=(location, "worse", sources["other"], 0.9, paused, go))
    worse.start()
    deadline = time.monotonic() + 30
    while not paused.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert paused.exists()
    better = FORK.Process(target=register_plain, args=(location, "better", sources["new"], 0.5))
    better.start()
    better.join(3)  # it waits for the lock the worse one holds (without a lock it would be done by now)
    go.touch()
    worse.join(30)
    better.join(30)
    assert (worse.exitcode, better.exitcode) == (0, 0)
    registry = Registry(location)
    assert registry.best(PHI2).name == "better"
    assert [e.name for e in registry.list()] == ["baseline", "better", "worse"]


def test_on_an_object_store_the_better_adapter_stays_best_when_a_worse_one_writes_the_pointer_last(
    tmp_path, sources, memory_location
):
    Registry(memory_location).register("baseline", sources["old"], manifest(1.0))
    paused, go = threading.Event(), threading.Event()
    worse = threading.Thread(target=register_paused, args=(memory_location, "worse", sources["other"], 0.9, paused, go))
    worse.start()
    assert paused.wait(30)
    register_plain(memory_location, "better", sources["new"], 0.5)  # the whole registration, meanwhile
    assert Registry(memory_location).best(PHI2).name == "better"
    go.set()
    worse.join(30)
    assert not worse.is_alive()
    registry = Registry(memory_location)
    assert registry.best(PHI2).name == "better"  # the worse one wrote last, read back and re-ranked
    assert [e.name for e in registry.list()] == ["baseline", "better", "worse"]


VALUES = [0.9, 0.4, 1.3, 0.7, 0.2, 1.1, 0.6, 0.3]


def test_many_processes_registering_at_once_leave_the_best_as_best(tmp_path):
    location = str(tmp_path / "registry")
    sources = [fake_adapter(tmp_path, str(i)) for i in range(len(VALUES))]
    processes = [
        FORK.Process(target=register_plain, args=(location, f"p{i}", sources[i], value))
        for i, value in enumerate(VALUES)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0] * len(VALUES)
    registry = Registry(location)
    assert len(registry.list()) == len(VALUES)
    assert registry.best(PHI2).name == f"p{VALUES.index(min(VALUES))}"


@pytest.mark.parametrize("kind", ["path", "memory"])
def test_many_threads_registering_at_once_leave_the_best_as_best(tmp_path, memory_location, kind):
    location = str(tmp_path / "registry") if kind == "path" else memory_location
    sources = [fake_adapter(tmp_path, str(i)) for i in range(len(VALUES))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: interleave the registrations
    try:
        threads = [
            threading.Thread(target=register_plain, args=(location, f"t{i}", sources[i], value))
            for i, value in enumerate(VALUES)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    registry = Registry(location)
    assert len(registry.list()) == len(VALUES)
    assert registry.best(PHI2).name == f"t{VALUES.index(min(VALUES))}"


# A damaged registry


@pytest.fixture(params=["path", "memory"])
def damaged(request, tmp_path, memory_location):
    """A registry of three adapters, "best" (0.3, the pointer's), "good" (0.5) and "fine" (0.7)."""
    location = str(tmp_path / "registry") if request.param == "path" else memory_location
    registry = Registry(location)
    for i, (name, value) in enumerate([("best", 0.3), ("good", 0.5), ("fine", 0.7)]):
        registry.register(name, fake_adapter(tmp_path, str(i)), manifest(value))
    assert registry.best(PHI2).name == "best"
    return registry


def overwrite(registry: Registry, path: str, data: bytes) -> None:
    with registry.fs.open_output_stream(f"{registry.root}/{path}") as out:
        out.write(data)


def assert_no_paths(message: str, registry: Registry, tmp_path: Path) -> None:
    assert str(tmp_path) not in message and registry.root not in message and registry.location not in message


@pytest.mark.parametrize(
    "damage", [b"{not json", b"[1, 2]", b'{"metrics": {}}', b'{"base_model": "x", "revision": "../.."}']
)
def test_a_damaged_manifest_leaves_the_others_listed_and_errors_only_for_its_adapter(damaged, damage, tmp_path, caplog):
    overwrite(damaged, "adapters/good/manifest.json", damage)
    with caplog.at_level(logging.WARNING, logger="qlora_ray.registry"):
        assert [e.name for e in damaged.list()] == ["best", "fine"]
    assert "'good'" in caplog.text and "damaged" in caplog.text
    with pytest.raises(RegistryError, match=r"adapter 'good' is damaged: its manifest") as info:
        damaged.get("good")
    assert_no_paths(str(info.value), damaged, tmp_path)
    with pytest.raises(RegistryError, match="is damaged"):
        damaged.local_dir("good", tmp_path / "cache")
    assert damaged.get("fine").name == "fine" and damaged.best(PHI2).name == "best"
    # Registering again repairs it, and re-ranks from what can be read.
    damaged.register("good", fake_adapter(tmp_path, "repaired"), manifest(0.6), overwrite=True)
    assert [e.name for e in damaged.list()] == ["best", "fine", "good"]


def test_an_adapter_whose_files_are_missing_is_damaged(damaged, tmp_path, caplog):
    revision = damaged.get("good").manifest["revision"]
    damaged.fs.delete_dir(f"{damaged.root}/revisions/good/{revision}")
    with caplog.at_level(logging.WARNING, logger="qlora_ray.registry"):
        assert [e.name for e in damaged.list()] == ["best", "fine"]
    assert "'good'" in caplog.text
    with pytest.raises(RegistryError, match=r"adapter 'good' is damaged: its adapter files are missing") as info:
        damaged.get("good")
    assert_no_paths(str(info.value), damaged, tmp_path)


@pytest.mark.parametrize("how", ["removed", "files-missing", "manifest-damaged"])
def test_a_best_pointer_to_a_missing_or_damaged_adapter_falls_back_to_the_best_remaining(
    damaged, how, tmp_path, caplog
):
    if how == "removed":
        damaged.fs.delete_dir(f"{damaged.root}/adapters/best")
        damaged.fs.delete_dir(f"{damaged.root}/revisions/best")
    elif how == "files-missing":
        damaged.fs.delete_dir(f"{damaged.root}/revisions/best")
    else:
        overwrite(damaged, "adapters/best/manifest.json", b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="qlora_ray.registry"):
        assert damaged.best(PHI2).name == "good"
        assert damaged.best().name == "good"
    assert "names adapter 'best', which is missing or damaged" in caplog.text and "val_loss (min): good" in caplog.text
    assert [e.name for e in damaged.list()] == ["fine", "good"]
    # The next registration re-ranks the pointer from the manifests: it is whole again.
    damaged.register("later", fake_adapter(tmp_path, "later"), manifest(0.9))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_ray.registry"):
        assert damaged.best(PHI2).name == "good"
    assert "missing or damaged" not in caplog.text


def test_an_unreadable_best_pointer_ranks_by_val_loss(damaged, caplog):
    overwrite(damaged, "best/microsoft--phi-2.json", b"{truncated")
    with caplog.at_level(logging.WARNING, logger="qlora_ray.registry"):
        assert damaged.best(PHI2).name == "best"
        assert damaged.pointers() == {}
    assert "cannot be read" in caplog.text and "unreadable" in caplog.text


def test_a_failed_download_names_no_path(tmp_path, caplog):
    registry = Registry((tmp_path / "registry").as_uri())
    registry.register("remote", fake_adapter(tmp_path, "r"), manifest(1.0))
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="qlora_ray.registry"), pytest.raises(RegistryError) as info:
        registry.local_dir("remote", cache)
    assert str(info.value).startswith("adapter 'remote' could not be fetched from the registry")
    assert_no_paths(str(info.value), registry, tmp_path)
    assert str(cache) in caplog.text  # the log has the details
