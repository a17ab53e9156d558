"""The command line: ``qlora-ray`` and the ``python -m`` forms, their one error path, and the artifacts command."""

from __future__ import annotations

import json

from test_registry import PHI2, fake_adapter, manifest

from jobs.artifacts import main
from qlora_ray.registry import Registry


def test_cli_lists_shows_and_finds_the_best(tmp_path, capsys):
    location = str(tmp_path / "registry")
    assert main(["list", "--registry", location]) == 0
    assert f"(registry {location} is empty)" in capsys.readouterr().out
    registry = Registry(location)
    registry.register("phi-r8", fake_adapter(tmp_path, "1"), manifest(1.25))
    registry.register("phi-r16", fake_adapter(tmp_path, "2"), manifest(0.75))
    assert main(["list", "--registry", location]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "base", "model", "r", "alpha", "lr", "val_loss", "created"]
    best_line = next(line for line in lines if "phi-r16" in line)
    other_line = next(line for line in lines if "phi-r8" in line)
    assert best_line.startswith("*") and "0.7500" in best_line and PHI2 in best_line and "0.0002" in best_line
    assert not other_line.startswith("*") and "1.2500" in other_line
    assert main(["show", "phi-r8", "--registry", location]) == 0
    assert json.loads(capsys.readouterr().out) == registry.get("phi-r8").manifest
    assert main(["best", "--base", PHI2, "--registry", location]) == 0
    assert capsys.readouterr().out.splitlines() == ["phi-r16", registry.get("phi-r16").uri]


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    location = str(tmp_path / "registry")
    Registry(location).register("known", fake_adapter(tmp_path, "k"), manifest(1.0))
    assert main(["show", "nope", "--registry", location]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "known" in captured.err and "Traceback" not in captured.err
    assert main(["show", "../etc", "--registry", location]) == 1
    assert "letters, digits" in capsys.readouterr().err
    assert main(["best", "--registry", str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err.startswith("error: no best adapter")
    assert main(["list", "--registry", "nosuchscheme://x"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot open registry")


def test_cli_reads_the_registry_from_a_config(tmp_path, capsys):
    location = str(tmp_path / "from-config")
    Registry(location).register("cfg-entry", fake_adapter(tmp_path, "c"), manifest(1.0))
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  registry: {location}\n")
    assert main(["list", "--config", str(config)]) == 0
    assert "cfg-entry" in capsys.readouterr().out
    assert main(["list", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


