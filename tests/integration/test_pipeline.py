"""End to end: `ray start --head`, the pipeline submitted with `ray job submit`, the endpoint queried with the
openai client, the registry, model card and eval.json checked, a rerun resuming after the finished stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adapters import register_adapter
from processes import ENV, REPO, free_port

from qlora_ray.registry import Registry

pytestmark = pytest.mark.ray

NAME = "e2e-faq"


@pytest.fixture
def head(tmp_path):
    """A real single-node Ray cluster started with the CLI, stopped at the end."""
    bin_dir = str(Path(sys.executable).parent)  # the job's `python` is this environment's
    # Clusters started with `ray start` use token authentication (Ray >= 2.60); the CLI then sends the token.
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    ray = [f"{bin_dir}/ray"]
    dashboard, gcs = free_port(), free_port()
    start = [*ray, "start", "--head", "--port", str(gcs), "--num-cpus", "2", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--disable-usage-stats"]  # fmt: skip
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield {"env": env, "ray": ray, "address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}"}
    finally:
        subprocess.run([*ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _submit(head, args: list[str], log: Path, succeed: bool = True) -> str:
    command = [*head["ray"], "job", "submit", "--address", head["address"], "--working-dir", str(REPO),
               "--", "python", "-m", "jobs.pipeline", *args]  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        proc = subprocess.run(command, cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=900)
        output = proc.stdout + proc.stderr
        # A cluster that has just started may not have its job agent up yet: the job was not submitted.
        if "No available agent to submit job" not in output or time.monotonic() > deadline:
            break
        time.sleep(2)
    log.write_text(output)
    assert (proc.returncode == 0 and "succeeded" in output) == succeed, output[-6000:]
    return output


def test_pipeline_through_ray_job_submit_resumes_after_a_failed_stage_and_serves(head, tiny_phi_dir, tmp_path):
    from openai import OpenAI

    port = free_port()
    registry = tmp_path / "registry"
    args = [
        "--config", "configs/quickstart.yaml", "sweep.enabled=false",
        f"model.name_or_path={tiny_phi_dir}", "lora.target_modules=[q_proj,v_proj,fc1,fc2]", "train.max_seq_len=64",
        "train.epochs=1", "train.eval_every=0", "train.cpus_per_worker=1", "serve.cpus_per_replica=1",
        "serve.default_max_tokens=6", f"serve.port={port}", f"run.name={NAME}",
        f"run.storage_path={tmp_path / 'runs'}", f"run.registry={registry}",
    ]  # fmt: skip
    # A prompt limit too small for the smoke question: the last stage fails, naming itself and the cause.
    first = _submit(head, [*args, "serve.max_prompt_tokens=2"], tmp_path / "first.log", succeed=False)
    assert "stage train: running" in first and "stage evaluate: running" in first
    assert "error: stage smoke failed" in first and "serve.max_prompt_tokens" in first
    assert "finished stages kept: train, evaluate" in first and "resume from stage smoke" in first
    state = json.loads((tmp_path / "runs" / f"{NAME}.pipeline.json").read_text())
    assert set(state["finished"]) == {"train", "evaluate"}
    adapter = Path(Registry(str(registry)).get(NAME).uri)  # the files of its current revision
    trained = (adapter / "adapter_model.safetensors").stat().st_mtime

    # The same command with the limit fixed: train and evaluate are not redone; deploy and smoke run.
    second = _submit(head, args, tmp_path / "second.log")
    assert "stage train: finished before" in second and "stage evaluate: finished before" in second
    assert "stage train: running" not in second and (adapter / "adapter_model.safetensors").stat().st_mtime == trained
    assert "smoke query answered (model)" in second and f"http://127.0.0.1:{port}/v1" in second

    # The job ended; the app it deployed stays up on the cluster and answers the official client.
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    assert NAME in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "GALAXY < what is ?"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 4

    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "train" and manifest["metrics"]["val_loss"] > 0
    report = json.loads((adapter / "eval.json").read_text())
    overall = report["groups"]["overall"]
    assert overall["base"]["count"] == 15 and overall["tuned"]["holdout_loss"] > 0
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert f"| token F1 | {overall['base']['token_f1']:.4f} | {overall['tuned']['token_f1']:.4f} |" in card
    assert "Not evaluated yet" not in card and "| tag | train | holdout |" in card and "## Framework versions" in card


def test_keys_set_where_the_app_is_deployed_guard_it_on_the_cluster(head, tiny_phi_dir, tmp_path):
    """The README's way onto a running cluster: ``qlora-ray serve`` with ``RAY_ADDRESS``. The key is in the
    deploying shell only; the cluster's processes were started without it, and must still demand it."""
    import requests

    assert "QLORA_RAY_API_KEYS" not in head["env"]  # the cluster's raylet, and so every replica, lacks it
    registry = tmp_path / "registry"
    register_adapter(registry, "faq-a", tiny_phi_dir, seed=1, val_loss=1.0, staging=tmp_path / "staging")
    port = free_port()
    deploying = {**head["env"], "RAY_ADDRESS": head["gcs"], "QLORA_RAY_API_KEYS": "cluster-secret"}
    command = [sys.executable, "-m", "serve", "--config", "configs/quickstart.yaml",
               f"model.name_or_path={tiny_phi_dir}", f"run.registry={registry}", f"serve.port={port}",
               "serve.cpus_per_replica=1"]  # fmt: skip
    deployed = subprocess.run(command, cwd=REPO, env=deploying, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr  # deployed, and returned: a cluster
    assert "cluster-secret" not in deployed.stdout + deployed.stderr
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while requests.get(f"{url}/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the app did not become healthy"
        time.sleep(1)
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
    body = {"prompt": "GALAXY < what is ?", "max_tokens": 2}
    assert requests.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
    keyed = {"Authorization": "Bearer cluster-secret"}
    assert requests.get(f"{url}/v1/models", headers=keyed, timeout=10).json()["data"][0]["id"] == "faq-a"
    assert requests.post(f"{url}/v1/completions", json=body, headers=keyed, timeout=60).status_code == 200
