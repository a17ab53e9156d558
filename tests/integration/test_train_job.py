"""The training job on a real local Ray: DDP workers, the exported adapter, worker and driver failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import ENV, start, wait_for

REPO = Path(__file__).resolve().parents[2]
TARGETS = "[q_proj,k_proj,v_proj,dense,fc1,fc2]"


def _command(model_dir, storage, name, *extra):
    return [
        sys.executable, "-m", "jobs.train", "--config", str(REPO / "configs/quickstart.yaml"),
        f"model.name_or_path={model_dir}", f"lora.target_modules={TARGETS}", "lora.r=4", "lora.alpha=8",
        "train.max_seq_len=64", "train.lr=3e-3", "train.cpus_per_worker=1", "train.logging_steps=2",
        f"run.storage_path={storage}", f"run.name={name}", *extra,
    ]  # fmt: skip


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*/trainer_state.json"))


def _worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line and "ps -eo" not in line]


@pytest.mark.ray
def test_two_ddp_workers_produce_an_adapter_that_loads_with_transformers_and_peft_alone(tiny_phi_dir, tmp_path):
    command = _command(tiny_phi_dir, tmp_path, "ddp", "train.num_workers=2", "train.max_steps=6", "train.eval_every=3")
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    adapter = tmp_path / "ddp" / "adapter"
    assert f"adapter: {adapter}" in proc.stdout
    files = {p.name for p in adapter.iterdir()}
    expected = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "README.md",
        "metrics.json",
        "qlora_ray_config.yaml",
    }
    assert expected <= files, files
    metrics = json.loads((adapter / "metrics.json").read_text())
    assert metrics["step"] in (3, 6) and metrics["val_loss"] > 0
    assert "step 6/6" in proc.stdout + proc.stderr  # rank 0's progress lines reach the driver

    # Exactly the seed model cards' recipe, in a fresh interpreter that never imports qlora-ray.
    script = f"""
import json, sys
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
adapter = {str(adapter)!r}
base_id = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), adapter)
tokenizer = AutoTokenizer.from_pretrained(adapter)
inputs = tokenizer("what is ray ?", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
assert out.shape[1] > inputs["input_ids"].shape[1]
ours = [m for m in sys.modules if m.split(".")[0] in ("jobs", "data", "serve", "tune")]
assert not ours, ours
print("LOADED", base_id)
"""
    check = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert f"LOADED {tiny_phi_dir}" in check.stdout


@pytest.mark.ray
def test_killed_worker_restarts_from_the_last_checkpoint(tiny_phi_dir, tmp_path):
    command = _command(
        tiny_phi_dir, tmp_path, "flaky", "train.max_steps=120", "train.eval_every=10", "train.max_failures=1"
    )
    with open(tmp_path / "log.txt", "wb") as log:
        proc = start(command, log)
        try:
            # The controller registers a checkpoint shortly after the worker writes it: wait for a second one.
            wait_for(lambda: len(_checkpoints(tmp_path / "flaky")) >= 2, 300, "two checkpoints")
            time.sleep(1)
            pids = _worker_pids()
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            assert proc.wait(timeout=600) == 0, (tmp_path / "log.txt").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "log.txt").read_text()
    resumed = [
        int(line.split("resuming from step ")[1].split()[0])
        for line in output.splitlines()
        if "resuming from step" in line
    ]
    assert resumed and resumed[0] > 0 and resumed[0] % 10 == 0, output[-3000:]
    assert json.loads((tmp_path / "flaky/adapter/metrics.json").read_text())["step"] > resumed[0]


@pytest.mark.ray
def test_rerunning_after_the_driver_died_resumes(tiny_phi_dir, tmp_path):
    command = _command(tiny_phi_dir, tmp_path, "resume", "train.max_steps=120", "train.eval_every=10")
    with open(tmp_path / "first.txt", "wb") as log:
        proc = start(command, log)
        try:
            wait_for(lambda: len(_checkpoints(tmp_path / "resume")) >= 2, 300, "two checkpoints")
            time.sleep(1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reached = min(json.loads(p.read_text())["step"] for p in _checkpoints(tmp_path / "resume"))
    second = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    output = second.stdout + second.stderr
    line = next(li for li in output.splitlines() if "resuming from step" in li)
    assert int(line.split("resuming from step ")[1].split()[0]) >= reached > 0
    assert json.loads((tmp_path / "resume/adapter/metrics.json").read_text())["step"] in range(10, 121, 10)


@pytest.mark.ray
def test_a_local_storage_path_is_refused_on_a_multi_node_cluster(tiny_phi_dir, tmp_path, monkeypatch):
    """Two real Ray nodes (two raylets on this machine): a local run.storage_path cannot be shared by them."""
    from ray.cluster_utils import Cluster

    # Token auth is not what this tests: a fresh machine may hold no token for the job to present.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = {**ENV, "RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "disabled"}
        command = _command(tiny_phi_dir, tmp_path, "multi", "train.num_workers=2", "train.max_steps=2")
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        cluster.shutdown()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run.storage_path" in proc.stderr and "2 nodes" in proc.stderr and "s3://" in proc.stderr, proc.stderr[
        -5000:
    ]
    assert not (tmp_path / "multi").exists()  # refused before anything was written


@pytest.mark.ray
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_failure_inside_a_train_worker_reaches_the_console(tiny_phi_dir, tmp_path, verbose):
    """Quiet by default, but never about a failure: a worker's error is on the console, with or without -v."""
    command = _command(tiny_phi_dir, tmp_path, "diverges", "lora.alpha=1e30", "train.max_steps=2",
                       *(["--verbose"] if verbose else []))  # fmt: skip
    env = {**ENV, "QLORA_RAY_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 1, console[-3000:]
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert "training failed: rank 0:" in error and "the run diverged. Lower train.lr" in error, console[-3000:]
    assert "Traceback" not in error
    ray_train_lines = [line for line in console.splitlines() if "Requesting resources" in line]
    assert bool(ray_train_lines) == verbose, console[-3000:]  # Ray Train's own info lines only with -v
    log_file = tmp_path / "logs" / "diverges.train.log"
    assert "the run diverged" in log_file.read_text()
