"""The sweep on a real local Ray: ASHA over real trials, a failing trial, the registry, resume after a kill."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from processes import ENV, REPO, start, wait_for

TARGETS = "[q_proj,k_proj,v_proj,dense,fc1,fc2]"


def _command(model_dir, tmp_path, name, *extra):
    return [
        sys.executable, "-m", "tune.sweep", "--config", str(REPO / "configs/quickstart.yaml"),
        f"model.name_or_path={model_dir}", f"lora.target_modules={TARGETS}", "train.max_seq_len=64",
        "train.cpus_per_worker=1", "train.logging_steps=100", "sweep.cpus_per_trial=1",
        f"run.storage_path={tmp_path / 'runs'}", f"run.registry={tmp_path / 'registry'}", f"run.name={name}", *extra,
    ]  # fmt: skip


@pytest.mark.ray
@pytest.mark.parametrize(
    ("ranks", "workers"),
    [
        pytest.param([2, 4], [], id="one worker: trials train in their Tune actors"),
        pytest.param([2], ["train.num_workers=2", "sweep.cpus_per_trial=2"], id="two workers: a TorchTrainer each"),
    ],
)
def test_asha_sweep_reports_trials_survives_a_failing_one_and_registers_the_best(tiny_phi_dir, tmp_path, ranks,
                                                                                   workers):  # fmt: skip
    # A grid of each rank with alpha 8 or 1e30; the 1e30 trials diverge at once (a bad hyperparameter).
    # The trials that work are then ranked by their answers to the holdout split (token F1), not their loss.
    command = _command(
        tiny_phi_dir, tmp_path, "small", "sweep.search=grid", f"sweep.ranks={ranks}", "sweep.lr_grid=[0.003]",
        "sweep.alphas=[8,1e30]", "sweep.num_samples=1", "train.max_steps=6", "train.eval_every=2",
        "sweep.grace_period=2", "sweep.reduction_factor=2", "sweep.rank_by=token_f1", "sweep.rank_top_k=2",
        "serve.default_max_tokens=4", *workers,
    )  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    # Where the checkpoints are says which path trained: Ray Train runs, or the trials' own Tune directories.
    train_runs = list((tmp_path / "runs/small/train_runs").glob("*/checkpoint_*/trainer_state.json"))
    in_trials = list((tmp_path / "runs/small").glob("run_trial_*/checkpoint_*/trainer_state.json"))
    assert (bool(train_runs), bool(in_trials)) == ((True, False) if workers else (False, True))

    report = tmp_path / "runs/small/report"
    trials = list(csv.DictReader((report / "trials.csv").open()))
    assert len(trials) == 2 * len(ranks)
    failed = [t for t in trials if t["status"] == "failed"]
    assert {float(t["alpha"]) for t in failed} == {1e30} and all("diverged" in t["error"] for t in failed)
    ok = [t for t in trials if t["status"] != "failed"]
    assert len(ok) == len(ranks) and all(t["status"] in ("finished", "stopped early") for t in ok)
    assert (report / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((report / "trials.json").read_text())
    scores = {t["trial_id"]: t["generation"] for t in summary["trials"] if t["status"] != "failed"}
    assert len(scores) == len(ranks) and all(0 <= s <= 1 for s in scores.values())  # both answered and were scored
    assert all(t["generation"] is None for t in summary["trials"] if t["status"] == "failed")
    assert scores[summary["best_trial"]] == max(scores.values())
    best = next(t for t in ok if t["trial_id"] == summary["best_trial"])
    assert f"holdout answers token_f1 {scores[best['trial_id']]:.4f}" in output
    assert f"* {best['trial_id']}" in proc.stdout  # the printed table marks the winner

    # Tune's own results: per-trial progress and TensorBoard event files.
    assert len(list((tmp_path / "runs/small").glob("*/progress.csv"))) == len(ok)  # trials that reported
    assert list((tmp_path / "runs/small").glob("*/events.out.tfevents*"))
    assert any("running" in line and "best" in line for line in output.splitlines())  # live progress lines

    from qlora_ray.registry import Registry

    registry = Registry(str(tmp_path / "registry"))
    entry = registry.get("small")
    assert registry.best(entry.manifest["base_model"]).name == "small"
    manifest = entry.manifest
    assert manifest["source"]["trial"] == best["trial_id"]
    assert manifest["lora"]["r"] == int(best["r"]) and manifest["lora"]["alpha"] == 8
    assert manifest["metrics"]["val_loss"] == pytest.approx(float(best["best_val_loss"]))
    assert manifest["metrics"]["token_f1"] == pytest.approx(scores[best["trial_id"]])
    assert manifest["dataset"]["fingerprint"].startswith("sha256:")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {
        p.name for p in Path(entry.uri).iterdir()
    }


@pytest.mark.ray
def test_rerunning_after_the_driver_died_resumes_the_sweep(tiny_phi_dir, tmp_path):
    # Two trials, one at a time, no early stopping: kill the driver while the second one is under way.
    command = _command(
        tiny_phi_dir, tmp_path, "resume", "sweep.search=grid", "sweep.ranks=[2,4]", "sweep.lr_grid=[0.003]",
        "sweep.num_samples=1", "sweep.early_stopping=false", "sweep.max_concurrent_trials=1",
        "train.max_steps=60", "train.eval_every=5",
    )  # fmt: skip
    sweep = tmp_path / "runs/resume"

    def trial_dirs():  # Tune's, in trial order; one-worker trials keep their checkpoints there
        return sorted(p for p in sweep.glob("run_trial_*") if p.is_dir())

    def second_trial_checkpointed():
        dirs = trial_dirs()
        return len(dirs) == 2 and any(list(d.glob("checkpoint_*/trainer_state.json")) for d in dirs[1:])

    with open(tmp_path / "first.txt", "wb") as log:
        proc = start(command, log)
        try:
            wait_for(second_trial_checkpointed, 400, "the second trial's first checkpoint")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first = (tmp_path / "first.txt").read_text()
    finished_first = [
        line.split()[1] for line in first.splitlines() if line.startswith("trial ") and " finished at" in line
    ]
    assert len(finished_first) == 1, first[-3000:]

    second = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert "resuming the sweep" in output
    # The finished trial is not redone; the unfinished one continues from its checkpoint, not from step 0.
    assert not any(line.startswith(f"trial {finished_first[0]} (") for line in output.splitlines())
    resumed = [
        int(li.split("resuming from step ")[1].split()[0]) for li in output.splitlines() if "resuming from step" in li
    ]
    assert resumed and resumed[0] > 0, output[-4000:]
    trials = list(csv.DictReader((tmp_path / "runs/resume/report/trials.csv").open()))
    assert [t["status"] for t in trials] == ["finished", "finished"] and {t["steps"] for t in trials} == {"60"}
