import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.preflight import main, optimizer_steps, run_preflight
from qlora_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs/quickstart.yaml")


def test_quickstart_preflight_passes_and_reports_everything(capsys):
    assert main(["--config", QUICKSTART]) == 0
    out = capsys.readouterr().out
    for needle in ("rows ", "tag <QLORA>", "tokens       per row p50", "trainable", "memory", "steps", "passed"):
        assert needle in out, needle
    assert "o_proj" in out and "gate_proj" in out


def test_quickstart_preflight_numbers_are_consistent():
    cfg = load_config(QUICKSTART)
    result = run_preflight(cfg)
    assert result.ok, result.errors
    data = result.data
    assert len(data.train_rows) + len(data.holdout_rows) == len(data.loaded.examples) - data.report.skipped
    assert result.optimizer_steps == optimizer_steps(cfg, len(data.train_rows))
    assert result.trainable_params > 0 and 0 < result.memory_bytes < 4 * 1024**3


def test_steps_follow_epochs_workers_and_max_steps():
    cfg = load_config(QUICKSTART, ["train.epochs=3", "train.batch_size=4", "train.grad_accum=2", "train.num_workers=2"])
    assert optimizer_steps(cfg, 100) == 18  # 3 epochs x (50 rows per worker // 8 rows per step)
    assert optimizer_steps(load_config(QUICKSTART, ["train.max_steps=7"]), 100) == 7


def test_phi_shaped_model_with_the_original_hea_targets_fails_naming_o_proj(tiny_phi_dir, capsys):
    code = main(
        [
            "--config",
            str(REPO / "configs/hea-phi2.yaml"),
            f"model.name_or_path={tiny_phi_dir}",
            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
            f"data.path={REPO / 'data/samples/context_qa.json'}",
            "train.use_gpu=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "lora.target_modules: o_proj match(es) no linear layer" in err
    assert "dense" in err


def test_all_problems_are_reported_together(tiny_phi_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    code = main(["--config", QUICKSTART, f"model.name_or_path={tiny_phi_dir}", f"data.path={bad}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "2 problem(s)" in err
    assert f"{bad}:1: missing field 'completion'" in err and "o_proj" in err


def test_config_errors_exit_non_zero_before_loading_anything(capsys):
    assert main(["--config", QUICKSTART, "lora.rank=8"]) == 1
    assert "did you mean lora.r?" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "extra"), [("galaxy_alibaba_qa.json", []), ("hea_qa_squad.json", ["train.max_seq_len=512"])]
)
def test_seed_datasets_pass_with_the_quickstart_model(seed_data, name, extra, capsys):
    assert main(["--config", QUICKSTART, f"data.path={seed_data / name}", "data.format=auto", *extra]) == 0
    out = capsys.readouterr().out
    assert "bad 0" in out


def test_hea_seed_truncation_keeps_every_answer(seed_data):
    cfg = load_config(QUICKSTART, [f"data.path={seed_data / 'hea_qa_squad.json'}", "data.format=auto"])
    result = run_preflight(cfg)
    assert result.ok and result.data.report.truncated > 0
    assert all(len(r["input_ids"]) <= cfg.train.max_seq_len for r in result.data.train_rows)
    # every kept row still ends with its full answer and EOS, and each truncated row kept the answer span
    assert all(r["labels"][-1] == r["input_ids"][-1] for r in result.data.train_rows)


def test_readme_main_command_runs_as_a_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.preflight", "--config", "configs/quickstart.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preflight passed" in proc.stdout


def test_a_run_that_cannot_fit_is_refused_before_loading_weights(capsys):
    too_long = main(["--config", QUICKSTART, "train.max_seq_len=100000", "train.batch_size=100000"])
    err = capsys.readouterr().err
    assert too_long == 1
    assert "train.max_seq_len 100000 exceeds the 8192 positions" in err
    assert "needs about" in err and "lower train.batch_size" in err
