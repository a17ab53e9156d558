"""The evaluation job on a real local Ray: Ray Data actor pool, base vs adapter, eval.json in the registry."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from adapters import register_adapter
from processes import ENV

from qlora_ray.registry import Registry

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_evaluate_scores_base_and_adapter_per_tag_and_writes_eval_json(tiny_phi_dir, tmp_path):
    registry = tmp_path / "registry"
    register_adapter(registry, "faq-a", tiny_phi_dir, seed=1, val_loss=1.0, staging=tmp_path / "staging")
    command = [
        sys.executable, "-m", "jobs.evaluate", "--config", str(REPO / "configs/quickstart.yaml"), "--adapter", "faq-a",
        f"model.name_or_path={tiny_phi_dir}", "lora.target_modules=[q_proj,v_proj,fc1,fc2]", "train.max_seq_len=64",
        "train.cpus_per_worker=1", f"run.registry={registry}", "serve.default_max_tokens=6",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    adapter = Path(Registry(str(registry)).get("faq-a").uri)  # the files of its current revision
    report = json.loads((adapter / "eval.json").read_text())
    groups = report["groups"]
    tags = [g for g in groups if g != "overall"]
    assert len(tags) == 3  # the sample FAQ's three tags, each scored on its own
    assert groups["overall"]["base"]["count"] == sum(groups[t]["base"]["count"] for t in tags) == 15
    for side in ("base", "tuned"):
        metrics = groups["overall"][side]
        assert 0 <= metrics["token_f1"] <= 1 and 0 <= metrics["similarity_match_accuracy"] <= 1
        assert metrics["holdout_loss"] > 0 and metrics["holdout_perplexity"] > 1
    # The random adapter changes the model: its loss and its answers differ from the base's.
    assert groups["overall"]["base"]["holdout_loss"] != groups["overall"]["tuned"]["holdout_loss"]
    assert any(ex["base"] != ex["tuned"] for ex in report["examples"]) and len(report["examples"]) == 5
    assert "overall" in proc.stdout and "token_f1" in proc.stdout and "eval.json" in proc.stdout
    card = (adapter / "README.md").read_text()
    f1 = groups["overall"]["tuned"]["token_f1"]
    assert "## Evaluation" in card and f"| token F1 | {groups['overall']['base']['token_f1']:.4f} | {f1:.4f} |" in card
