"""The sweep's pieces that need no cluster: search space, trial configs, resources, scheduler, report."""

import importlib.util
import json

import pytest

from qlora_ray.config import ConfigError, from_dict
from tune import report
from tune.space import SweepError, grid_points, param_space, scheduler, searcher, trial_config, trial_count
from tune.sweep import trial_resources


def _cfg(**sweep):
    return from_dict({"data": {"path": "unused.jsonl"}, "train": {"eval_every": 5}, "sweep": sweep})


def test_random_search_draws_ranks_and_a_log_uniform_lr():
    from ray.tune.search.sample import Categorical, Float

    space = param_space(_cfg(ranks=[4, 8], lr_min=1e-5, lr_max=1e-3))
    assert isinstance(space["r"], Categorical) and space["r"].categories == [4, 8]
    assert isinstance(space["lr"], Float) and (space["lr"].lower, space["lr"].upper) == (1e-5, 1e-3)
    assert "alpha" not in space and "dropout" not in space  # alpha follows the rule unless searched


def test_grid_search_runs_every_point_in_a_seeded_shuffled_order():
    cfg = _cfg(search="grid", ranks=[4, 8, 16, 32], lr_grid=[1e-4, 3e-4], alphas=[8, 16], num_samples=2)
    points = grid_points(cfg)
    every = [{"r": r, "lr": lr, "alpha": a} for r in [4, 8, 16, 32] for lr in [1e-4, 3e-4] for a in [8, 16]]
    key = lambda p: (p["r"], p["lr"], p["alpha"])  # noqa: E731
    assert trial_count(cfg) == len(points) == 32
    assert sorted(points[:16], key=key) == every and sorted(points[16:], key=key) == every  # each round whole
    assert points[:16] != every and points[:16] != points[16:]  # not in written order, rounds differ
    assert grid_points(cfg) == points  # seeded by train.seed: a rerun (or resume) sees the same order
    assert searcher(cfg, 2).max_concurrent == 2
    space = param_space(cfg)
    assert space["r"].categories == [4, 8, 16, 32] and space["lr"].categories == [1e-4, 3e-4]
    assert trial_count(_cfg(num_samples=5)) == 5 and grid_points(_cfg(ranks=[8], lr_grid=[1e-4], num_samples=1)) == [
        {"r": 8, "lr": 1e-4}
    ]


def test_a_trial_config_applies_rank_lr_and_the_alpha_rule():
    base = _cfg(alpha_per_rank=2)
    cfg = trial_config(base, {"r": 32, "lr": 3e-4})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.lr, cfg.lora.dropout) == (32, 64, 3e-4, base.lora.dropout)
    searched = trial_config(base, {"r": 8, "lr": 1e-4, "alpha": 24, "dropout": 0.1})
    assert (searched.lora.alpha, searched.lora.dropout) == (24, 0.1)


@pytest.mark.parametrize(
    ("overrides", "cluster", "per_worker", "concurrent"),
    [
        ({"train": {"cpus_per_worker": 2}}, {"CPU": 2}, {"CPU": 1.99}, 1),
        ({"sweep": {"cpus_per_trial": 1}}, {"CPU": 2}, {"CPU": 0.99}, 2),  # driver + worker = 1 CPU: two fit
        ({"sweep": {"cpus_per_trial": 1, "max_concurrent_trials": 1}}, {"CPU": 8}, {"CPU": 0.99}, 1),
        ({"train": {"use_gpu": True, "cpus_per_worker": 1}, "sweep": {"gpus_per_trial": 0.5}},
         {"CPU": 16, "GPU": 1}, {"CPU": 0.99, "GPU": 0.5}, 2),
        ({"train": {"use_gpu": True, "num_workers": 2}, "sweep": {"cpus_per_trial": 4}},
         {"CPU": 16, "GPU": 4}, {"CPU": 1.995, "GPU": 1}, 2),
    ],
)  # fmt: skip
def test_trial_resources_and_how_many_trials_fit(overrides, cluster, per_worker, concurrent):
    raw = {"data": {"path": "unused.jsonl"}, **overrides}
    resources, fits = trial_resources(from_dict(raw), cluster)
    assert resources == pytest.approx(per_worker) and fits == concurrent


def test_fractional_gpus_need_train_use_gpu():
    with pytest.raises(ConfigError, match=r"sweep\.gpus_per_trial is set but train\.use_gpu is false"):
        from_dict({"sweep": {"gpus_per_trial": 0.5}})
    with pytest.raises(ConfigError, match=r"lr_min \(0.001\) is above lr_max"):
        from_dict({"sweep": {"lr_min": 1e-3, "lr_max": 1e-4}})


def test_asha_starts_at_the_first_evaluation_and_can_be_turned_off():
    asha = scheduler(_cfg(reduction_factor=2), total_steps=40)
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == ("step", 40, 2)
    milestones = [milestone for milestone, _ in asha._brackets[0]._rungs]
    assert milestones == [40, 20, 10, 5]  # from the grace period (train.eval_every) up by the reduction factor
    assert scheduler(_cfg(early_stopping=False), total_steps=40) is None


def test_optuna_is_optional_with_a_clear_message():
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(SweepError, match=r"pip install 'qlora-ray\[optuna\]'"):
            searcher(_cfg(search="optuna"), 2)
    else:
        assert type(searcher(_cfg(search="optuna"), 2)).__name__ == "ConcurrencyLimiter"
    assert type(searcher(_cfg(), 2)).__name__ == "BasicVariantGenerator"


def test_report_table_files_and_plot(tmp_path):
    records = [
        report.TrialRecord("t1", 8, 16, 1e-4, 0.05, "finished", 20, 3.5, [(10, 3.9), (20, 3.5)], "/ckpt/1"),
        report.TrialRecord("t2", 16, 32, 5e-4, 0.05, "stopped early", 10, 4.2, [(10, 4.2)], "/ckpt/2"),
        report.TrialRecord("t3", 32, 64, 3e-4, 0.05, "failed", error="the run diverged"),
    ]
    text = report.table(records, "val_loss", "t1")
    lines = text.splitlines()
    assert "best val_loss" in lines[0] and lines[1].startswith("* t1") and lines[2].startswith("  t2")
    assert lines[3].endswith("failed: the run diverged")
    files = report.write(records, tmp_path, "val_loss", "t1")
    rows = (tmp_path / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("trial_id,r,alpha,lr")
    saved = json.loads(files["json"].read_text())
    assert saved["best_trial"] == "t1" and saved["trials"][0]["history"] == [[10, 3.9], [20, 3.5]]
    assert files["png"].read_bytes()[:4] == b"\x89PNG" and files["png"].stat().st_size > 10_000


def test_a_resume_with_other_settings_is_refused(tmp_path):
    import yaml

    from tune.sweep import SWEEP_CONFIG, _check_same_sweep

    cfg = _cfg(ranks=[4, 8])
    (tmp_path / SWEEP_CONFIG).write_text(yaml.safe_dump(cfg.model_dump()))
    _check_same_sweep(str(tmp_path), cfg)  # the same settings resume
    with pytest.raises(SweepError, match=r"train\.max_steps, sweep\.ranks differ"):
        _check_same_sweep(
            str(tmp_path),
            from_dict(
                {**cfg.model_dump(), "sweep": {"ranks": [8]}, "train": {**cfg.model_dump()["train"], "max_steps": 3}}
            ),
        )
