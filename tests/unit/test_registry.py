"""The adapter registry on real files: plain-path and file:// registries, names, best pointers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.fs
import pytest

from qlora_ray.config import from_dict
from qlora_ray.registry import (
    Entry,
    Registry,
    RegistryError,
    base_key,
    dataset_fingerprint,
    manifest_for,
    validate_name,
)

PHI2 = "microsoft/phi-2"


def fake_adapter(root: Path, tag: str) -> Path:
    """A small PEFT-shaped directory with a nested file, distinct per tag."""
    directory = root / f"src-{tag}"
    (directory / "sub").mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": PHI2, "r": 8}))
    (directory / "adapter_model.safetensors").write_bytes(f"weights {tag}".encode() * 100)
    (directory / "sub" / "tokenizer.json").write_text(f'{{"tag": "{tag}"}}')
    return directory


def manifest(val_loss: float, base: str = PHI2, **metrics: float) -> dict:
    return {
        "base_model": base,
        "lora": {"r": 8, "alpha": 16.0},
        "training": {"lr": 2e-4},
        "metrics": {"val_loss": val_loss, **metrics},
    }


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(params=["path", "file-uri"])
def location(request, tmp_path) -> str:
    root = tmp_path / "registry"
    return str(root) if request.param == "path" else root.as_uri()


def test_register_list_and_get(location, tmp_path):
    registry = Registry(location)
    assert registry.list() == [] and registry.best() is None
    second = registry.register("b-adapter", fake_adapter(tmp_path, "b"), manifest(1.2))
    first = registry.register("a-adapter", fake_adapter(tmp_path, "a"), manifest(1.5))
    assert [e.name for e in registry.list()] == ["a-adapter", "b-adapter"]
    assert registry.get("a-adapter") == first and isinstance(first, Entry)
    assert first.manifest["name"] == "a-adapter" and first.manifest["created"].endswith("+00:00")
    assert first.uri == f"{location}/revisions/a-adapter/{first.manifest['revision']}"
    assert second.uri.startswith("file://") == location.startswith("file://")
    home = tmp_path / "registry" / "adapters" / "b-adapter"
    stored = tmp_path / "registry" / "revisions" / "b-adapter" / second.manifest["revision"]
    assert [p.name for p in home.iterdir()] == ["manifest.json"] and stored.parent.name == "b-adapter"
    assert files_of(stored) == files_of(tmp_path / "src-b") | {"manifest.json": (stored / "manifest.json").read_bytes()}
    assert json.loads((stored / "manifest.json").read_text()) == json.loads((home / "manifest.json").read_text())
    assert json.loads((home / "manifest.json").read_text()) == second.manifest


def test_location_of_is_where_the_next_registration_puts_the_files(location, tmp_path):
    registry = Registry(location)
    promised = registry.location_of("carded")  # export writes it into the model card before registering
    assert promised == registry.location_of("carded")
    assert registry.register("carded", fake_adapter(tmp_path, "c"), manifest(1.0)).uri == promised
    assert registry.location_of("carded") != promised  # the next registration gets a fresh revision


def test_a_manifest_without_revision_has_its_files_beside_it(tmp_path):
    # Registries written before revisions existed: still read, and replaced whole by an overwrite.
    registry = Registry(str(tmp_path / "registry"))
    home = write_unrevisioned(tmp_path / "registry", "old-style", fake_adapter(tmp_path, "o"), manifest(1.0))
    entry = registry.get("old-style")
    assert entry.uri == str(home) and registry.local_dir("old-style", tmp_path / "cache") == str(home)
    assert registry.best(PHI2) is None  # no pointer was written for it
    registry.register("old-style", fake_adapter(tmp_path, "n"), manifest(0.5), overwrite=True)
    stored = Path(registry.get("old-style").uri)
    assert [p.name for p in home.iterdir()] == ["manifest.json"]  # the old files are gone
    assert files_of(stored) == files_of(tmp_path / "src-n") | {"manifest.json": (stored / "manifest.json").read_bytes()}
    assert registry.best(PHI2).name == "old-style"


def write_unrevisioned(root: Path, name: str, source: Path, manifest: dict) -> Path:
    """An adapter as registries wrote them before revisions: files and manifest side by side."""
    home = root / "adapters" / name
    shutil.copytree(source, home)
    (home / "manifest.json").write_text(json.dumps({**manifest, "name": name, "created": "2024-01-01T00:00:00+00:00"}))
    return home


def test_listing_skips_staging_and_incomplete_directories(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    registry.register("good", fake_adapter(tmp_path, "g"), manifest(1.0))
    adapters = tmp_path / "registry" / "adapters"
    (adapters / ".staging-half-1234").mkdir()
    (adapters / ".staging-half-1234" / "manifest.json").write_text("{}")
    (adapters / "no-manifest").mkdir()
    assert [e.name for e in registry.list()] == ["good"]


def test_best_pointer_moves_only_on_improvement_min(location, tmp_path):
    registry = Registry(location)
    registry.register("first", fake_adapter(tmp_path, "1"), manifest(1.0))
    assert registry.best(PHI2).name == "first"
    registry.register("worse", fake_adapter(tmp_path, "2"), manifest(1.3))
    registry.register("tie", fake_adapter(tmp_path, "3"), manifest(1.0))
    assert registry.best(PHI2).name == "first"
    registry.register("better", fake_adapter(tmp_path, "4"), manifest(0.7))
    assert registry.best().name == "better"
    pointer = json.loads((tmp_path / "registry" / "best" / "microsoft--phi-2.json").read_text())
    assert pointer["name"] == "better" and pointer["value"] == 0.7
    assert (pointer["metric"], pointer["mode"]) == ("val_loss", "min") and pointer["updated"].endswith("+00:00")


def test_best_pointer_max_mode_and_per_base_model(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    other = "/models/tiny-llama"
    registry.register("acc-1", fake_adapter(tmp_path, "1"), manifest(1.0, accuracy=0.6), metric="accuracy", mode="max")
    registry.register("acc-2", fake_adapter(tmp_path, "2"), manifest(1.0, accuracy=0.5), metric="accuracy", mode="max")
    assert registry.best(PHI2).name == "acc-1"
    registry.register("acc-3", fake_adapter(tmp_path, "3"), manifest(1.0, accuracy=0.8), metric="accuracy", mode="max")
    assert registry.best(PHI2).name == "acc-3"
    registry.register("llama", fake_adapter(tmp_path, "4"), manifest(9.0, base=other))
    assert registry.best(other).name == "llama" and registry.best(PHI2).name == "acc-3"
    assert registry.best("never/registered") is None
    with pytest.raises(RegistryError, match=r"2 base models.*choose one"):
        registry.best()
    with pytest.raises(RegistryError, match=r"ranks by accuracy \(max\)"):
        registry.register("loss", fake_adapter(tmp_path, "5"), manifest(0.1))
    registry.set_best("acc-2", metric="accuracy", mode="max")
    assert registry.best(PHI2).name == "acc-2"


def test_base_keys_are_path_safe_and_do_not_collide():
    assert base_key(PHI2) == "microsoft--phi-2" and base_key("gpt2") == "gpt2"
    first, second = base_key("/data/a/model"), base_key("/data/b/model")
    assert first.startswith("model-") and second.startswith("model-") and first != second
    assert base_key("/data/a/model/") == first
    assert "/" not in base_key("builtin:smollm2-135m-instruct") and ":" not in base_key("builtin:x")


def test_overwrite_refused_then_allowed(location, tmp_path):
    registry = Registry(location)
    registry.register("same", fake_adapter(tmp_path, "old"), manifest(1.0))
    with pytest.raises(RegistryError, match=r"already exists.*overwrite=True"):
        registry.register("same", fake_adapter(tmp_path, "new"), manifest(0.5))
    assert registry.get("same").manifest["metrics"]["val_loss"] == 1.0
    registry.register("same", tmp_path / "src-new", manifest(0.5), overwrite=True)
    stored = Path(registry.get("same").uri.removeprefix("file://"))
    assert (stored / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "src-new/adapter_model.safetensors"
    ).read_bytes()
    assert registry.best().manifest["metrics"]["val_loss"] == 0.5
    assert [p.name for p in (tmp_path / "registry" / "adapters").iterdir()] == ["same"]
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # the old revision is gone


def test_overwriting_the_best_with_a_worse_result_reranks(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    registry.register("a", fake_adapter(tmp_path, "a"), manifest(0.5))
    registry.register("b", fake_adapter(tmp_path, "b"), manifest(0.8))
    registry.register("a", tmp_path / "src-a", manifest(0.9), overwrite=True)
    assert registry.best(PHI2).name == "b"


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x..y", "n" * 200, "a b", "-x"])
def test_bad_names_are_refused_before_anything_is_written(tmp_path, bad):
    source = fake_adapter(tmp_path, "s")
    root = tmp_path / "registry"
    registry = Registry(str(root))
    with pytest.raises(RegistryError) as info:
        registry.register(bad, source, manifest(1.0))
    message = str(info.value)
    assert repr(bad) in message and "letters, digits" in message and "no '..'" in message and "e.g." in message
    assert not root.exists() and not (tmp_path / "x").exists()
    for call in (registry.get, registry.set_best, lambda n: registry.local_dir(n, tmp_path / "cache")):
        with pytest.raises(RegistryError, match="letters, digits"):
            call(bad)
    assert not root.exists() and not (tmp_path / "cache").exists()
    with pytest.raises(RegistryError):
        validate_name(bad)


def test_a_symlink_out_of_the_registry_is_refused(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    registry.register("ok", fake_adapter(tmp_path, "ok"), manifest(1.0))
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "registry" / "adapters" / "escape").symlink_to(outside)
    with pytest.raises(RegistryError, match="outside the registry root"):
        registry.get("escape")


def test_an_unknown_name_is_not_registered_and_the_error_names_no_other_adapter_or_path(location, tmp_path):
    # Serve shows this message to HTTP clients (a 404): it must not tell them what else is there, or where.
    registry = Registry(location)
    registry.register("alpha", fake_adapter(tmp_path, "a"), manifest(1.0))
    registry.register("beta", fake_adapter(tmp_path, "b"), manifest(1.0))
    with pytest.raises(RegistryError) as info:
        registry.get("missing")
    message = str(info.value)
    assert message == "no adapter named 'missing' is registered; list the registry with: qlora-ray artifacts list"
    assert "alpha" not in message and "beta" not in message and str(tmp_path) not in message
    assert registry.find("missing") is None and registry.find("beta").name == "beta"


def test_register_checks_its_inputs(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    with pytest.raises(RegistryError, match=r"adapter_config\.json"):
        registry.register("x", tmp_path, manifest(1.0))
    with pytest.raises(RegistryError, match="base_model"):
        registry.register("x", fake_adapter(tmp_path, "x"), {"metrics": {}})
    assert not (tmp_path / "registry").exists()


def test_local_dir_is_the_entry_for_a_plain_path_registry(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    entry = registry.register("here", fake_adapter(tmp_path, "h"), manifest(1.0))
    home = tmp_path / "registry/revisions/here" / entry.manifest["revision"]
    assert registry.local_dir("here", tmp_path / "cache") == entry.uri == str(home)
    assert not (tmp_path / "cache").exists()


def test_local_dir_downloads_a_uri_registry_once(tmp_path):
    registry = Registry((tmp_path / "registry").as_uri())
    registry.register("remote", fake_adapter(tmp_path, "r"), manifest(1.0))
    cache = tmp_path / "cache"
    local = Path(registry.local_dir("remote", cache))
    assert local == cache / "remote"
    assert files_of(local) == files_of(Path(registry.get("remote").uri.removeprefix("file://")))
    marker = local / "sub" / "tokenizer.json"
    marker.write_text("touched")  # a second call reuses the copy instead of fetching again
    assert registry.local_dir("remote", cache) == str(local) and marker.read_text() == "touched"
    registry.register("remote", fake_adapter(tmp_path, "r2"), manifest(0.5), overwrite=True)
    fetched = files_of(Path(registry.local_dir("remote", cache)))
    assert fetched == files_of(Path(registry.get("remote").uri.removeprefix("file://")))
    assert fetched["adapter_model.safetensors"] == b"weights r2" * 100
    assert [p.name for p in cache.iterdir()] == ["remote"]


def test_manifest_for_records_config_metrics_data_and_source():
    cfg = from_dict(
        {
            "model": {"name_or_path": PHI2, "quantization": "nf4"},
            "lora": {"r": 32, "alpha": 64, "dropout": 0.1, "target_modules": ["q_proj", "dense"]},
            "data": {"path": "data/samples/faq.jsonl", "format": "prompt_completion"},
            "train": {"lr": 1e-4, "epochs": 3, "batch_size": 4, "grad_accum": 4, "optimizer": "paged_adamw_8bit"},
        }
    )
    source = {"kind": "sweep", "trial": "trial_0001", "path": "runs/sweep/trial_0001"}
    rows = {"train": 90, "holdout": 10}
    m = manifest_for(
        cfg, {"val_loss": 1, "step": 12, "note": "x"}, data_fingerprint="sha256:ab", rows=rows, source=source
    )
    assert m["base_model"] == PHI2 and m["quantization"] == "nf4"
    assert m["lora"] == {"r": 32, "alpha": 64.0, "dropout": 0.1, "target_modules": ["q_proj", "dense"]}
    training = m["training"]
    assert (training["lr"], training["epochs"], training["batch_size"], training["grad_accum"]) == (1e-4, 3, 4, 4)
    assert {"max_steps", "max_seq_len", "optimizer", "lr_scheduler", "warmup_ratio", "seed"} <= set(training)
    assert m["metrics"] == {"val_loss": 1.0, "step": 12.0} and isinstance(m["metrics"]["val_loss"], float)
    assert m["dataset"] == {
        "path": "data/samples/faq.jsonl",
        "format": "prompt_completion",
        "fingerprint": "sha256:ab",
        "rows": rows,
    }
    assert m["source"] == source and m["created"].endswith("+00:00") and m["project_version"]
    assert json.loads(json.dumps(m)) == m


def test_dataset_fingerprint_follows_the_bytes(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    first = dataset_fingerprint(str(data))
    assert first.startswith("sha256:") and dataset_fingerprint(str(data)) == first
    data.write_text('{"prompt": "a", "completion": "c"}\n')
    assert dataset_fingerprint(str(data)) != first
    directory = tmp_path / "dataset"
    directory.mkdir()
    (directory / "part-0.parquet").write_bytes(b"one")
    before = dataset_fingerprint(str(directory))
    (directory / "part-0.parquet").write_bytes(b"two")
    assert dataset_fingerprint(str(directory)) != before
    assert dataset_fingerprint("org/some-hub-dataset") == "name:org/some-hub-dataset"


def test_an_object_store_registry_uploads_a_new_revision_before_removing_the_old(tmp_path, memory_location):
    # fsspec's in-memory store: no directory rename and no locks, as on S3 or GCS.
    registry = Registry(memory_location)
    first = registry.register("direct", fake_adapter(tmp_path, "d"), manifest(1.0))
    second = registry.register("direct", fake_adapter(tmp_path, "d2"), manifest(0.5), overwrite=True)
    assert first.uri != second.uri and second.uri.startswith(f"{memory_location}/revisions/direct/r-")
    revisions = registry.fs.get_file_info(pyarrow.fs.FileSelector(f"{registry.root}/revisions/direct"))
    assert [i.base_name for i in revisions] == [second.manifest["revision"]]  # the old one went after the switch
    local = Path(registry.local_dir("direct", tmp_path / "cache"))
    assert files_of(local) == files_of(tmp_path / "src-d2") | {"manifest.json": (local / "manifest.json").read_bytes()}
    assert [e.name for e in registry.list()] == ["direct"] and registry.best().manifest["metrics"]["val_loss"] == 0.5
    written = registry.write_file("direct", "eval.json", "{}")
    assert written == f"{second.uri}/eval.json"
