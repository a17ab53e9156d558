"""Tokenisation through Ray Data gives exactly the rows and counts of the in-process path."""

from pathlib import Path

import pytest

from data.dataset import prepare
from data.tokenize import TokenizeSettings
from qlora_ray.config import from_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_data_path_matches_in_process_path(local_ray, tiny_tokenizer):
    raw = {"data": {"path": str(REPO / "data/samples/context_qa.json"), "format": "auto"}, "train": {"max_seq_len": 48}}
    cfg = from_dict(raw)
    settings = TokenizeSettings.from_config(cfg)
    in_process = prepare(cfg.data, tiny_tokenizer, settings)
    cfg.data.ray_data_min_rows = 0
    on_ray = prepare(cfg.data, tiny_tokenizer, settings)
    assert on_ray.train_rows == in_process.train_rows and on_ray.holdout_rows == in_process.holdout_rows
    assert (on_ray.report.rows, on_ray.report.truncated, on_ray.report.skipped) == (
        in_process.report.rows,
        in_process.report.truncated,
        in_process.report.skipped,
    )
    assert in_process.report.truncated > 0  # the short max_seq_len exercises the context-window policy
