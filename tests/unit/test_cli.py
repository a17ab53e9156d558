"""The command line: ``qlora-ray`` and the ``python -m`` forms, their one error path, and the artifacts command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_registry import PHI2, fake_adapter, manifest

from jobs.artifacts import main
from jobs.cli import main as cli_main
from qlora_ray.registry import Registry

REPO = Path(__file__).resolve().parents[2]


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




COMMANDS = ["preflight", "train", "sweep", "evaluate", "serve", "pipeline"]
QUICKSTART = "configs/quickstart.yaml"


def test_the_console_script_lists_every_command():
    script = Path(sys.executable).parent / "qlora-ray"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    for command in [*COMMANDS, "artifacts"]:
        assert f"  {command}" in proc.stdout


def test_an_unknown_command_is_one_error_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["trian"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "error: argument COMMAND: invalid choice: 'trian'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reports_a_config_mistake_the_same_way(command, capsys):
    extra = ["--adapter", "x"] if command == "evaluate" else []
    assert cli_main([command, "--config", QUICKSTART, "lora.rank=8", *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 1 problem(s) in config configs/quickstart.yaml")
    assert "lora.rank: unknown key; did you mean lora.r?" in err and "Traceback" not in err


def test_a_missing_flag_is_exit_1_with_the_command_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "--config", QUICKSTART])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "error: the following arguments are required: --adapter" in err and "qlora-ray evaluate --help" in err


def test_the_python_m_forms_are_the_same_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.preflight", "--config", QUICKSTART, "train.lr=2"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith("error: 1 problem(s) in config")
    assert "train.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_a_command_writes_its_log_file_and_says_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QLORA_RAY_LOG_DIR", str(tmp_path / "logs"))
    location = tmp_path / "registry"
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  name: logged\n  registry: {location}\n")
    assert cli_main(["preflight", "--config", str(config), "data.path=missing.jsonl"]) == 1
    err = capsys.readouterr().err
    log_file = tmp_path / "logs" / "logged.preflight.log"
    assert f"log: {log_file}" in err and "missing.jsonl" in err
    assert "missing.jsonl" in log_file.read_text()


def test_an_unwritable_log_directory_is_a_warning_not_a_failure(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("QLORA_RAY_LOG_DIR", str(blocked / "logs"))
    assert cli_main(["preflight", "--config", QUICKSTART, "data.path=missing.jsonl"]) == 1
    err = capsys.readouterr().err
    assert "no log file: cannot write" in err and "QLORA_RAY_LOG_DIR" in err and "missing.jsonl" in err


@pytest.mark.parametrize("argv", [["-v", "artifacts", "list"], ["artifacts", "list", "-v"], ["artifacts", "-v", "list"]])
def test_verbose_goes_anywhere_on_the_artifacts_command(argv, tmp_path, capsys):
    assert cli_main([*argv, "--registry", str(tmp_path / "registry")]) == 0
    assert "is empty" in capsys.readouterr().out


def test_a_command_leaves_the_process_as_it_found_it(tmp_path, monkeypatch):
    import logging
    import os

    monkeypatch.delenv("QLORA_RAY_VERBOSE", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    before = list(logging.getLogger().handlers)
    assert cli_main(["artifacts", "list", "--registry", str(tmp_path / "registry")]) == 0
    assert list(logging.getLogger().handlers) == before
    assert "QLORA_RAY_VERBOSE" not in os.environ and "TQDM_DISABLE" not in os.environ


def test_the_job_environment_carries_the_console_choice_but_no_local_path(monkeypatch):
    from qlora_ray import console

    monkeypatch.delenv("QLORA_RAY_VERBOSE", raising=False)
    console.setup(verbose=False)
    try:
        quiet = console.ray_environment()
    finally:
        console.teardown()
    assert quiet["QLORA_RAY_VERBOSE"] == "0" and quiet["TQDM_DISABLE"] == "1"
    assert "RAY_DATA_LOGGING_CONFIG" not in quiet  # a path on this machine, not on a cluster's other nodes
    console.setup(verbose=True)
    try:
        assert console.ray_environment() == {"QLORA_RAY_VERBOSE": "1"}
    finally:
        console.teardown()
