"""The pipeline's record of finished stages: kept across reruns, refused when the config changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.pipeline import PipelineState, StageError
from qlora_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_a_changed_config_is_refused_naming_the_keys_and_the_fix(tmp_path):
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"run.storage_path={tmp_path}"])
    state = PipelineState.load(cfg, str(tmp_path))
    state.done("train", {"adapter": "x", "logdir": "y"})
    assert PipelineState.load(cfg, str(tmp_path)).finished == {"train": {"adapter": "x", "logdir": "y"}}
    served = load_config(REPO / "configs/quickstart.yaml", [f"run.storage_path={tmp_path}", "serve.port=9"])
    assert PipelineState.load(served, str(tmp_path)).finished  # serve settings do not touch finished stages
    changed = load_config(REPO / "configs/quickstart.yaml", [f"run.storage_path={tmp_path}", "lora.r=4"])
    with pytest.raises(StageError, match=r"lora\.r differ.*another run\.name, or delete that file"):
        PipelineState.load(changed, str(tmp_path))
