"""cluster.yaml against the cluster launcher's own schema and checks, from the installed ray package."""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def _config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_the_launchers_validation():
    # Ray offers no public API for the cluster launcher's checks; these are the functions `ray up` calls.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _config()
    validate_config(config)  # the JSON schema shipped in ray/autoscaler, then the launcher's own checks
    prepared = prepare_config(config)  # what `ray up` does next: fill in the AWS defaults
    assert prepared["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1


def test_cluster_yaml_is_locked_down():
    config = _config()
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]  # SSH only
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    assert any("pip install -c ~/qlora-ray/constraints.txt -e ~/qlora-ray" in c for c in config["setup_commands"])


def test_every_key_has_a_comment():
    lines = CLUSTER_YAML.read_text().splitlines()
    keyed = [line for line in lines if line.strip() and not line.lstrip().startswith(("#", "-")) and ":" in line]
    missing = [line for line in keyed if "#" not in line and not line.rstrip().endswith((">-",))]
    assert not missing, missing
