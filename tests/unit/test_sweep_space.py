"""The sweep's pieces that need no cluster: search space, trial configs, resources, scheduler, report."""

import csv
import importlib.util
import itertools
import json
from types import SimpleNamespace

import pytest

from qlora_ray.config import ConfigError, from_dict, load_config
from tune import report
from tune.space import (
    SweepError,
    describe,
    grid_points,
    param_space,
    peak_params,
    scheduler,
    searcher,
    trial_config,
    trial_count,
)
from tune.sweep import trial_resources


def _cfg(**sweep):
    return from_dict({"data": {"path": "unused.jsonl"}, "train": {"eval_every": 5}, "sweep": sweep})


def test_random_search_draws_ranks_and_a_log_uniform_lr():
    from ray.tune.search.sample import Categorical, Float

    space = param_space(_cfg(ranks=[4, 8], lr_min=1e-5, lr_max=1e-3))
    assert isinstance(space["lora.r"], Categorical) and space["lora.r"].categories == [4, 8]
    assert isinstance(space["train.lr"], Float) and (space["train.lr"].lower, space["train.lr"].upper) == (1e-5, 1e-3)
    assert list(space) == ["lora.r", "train.lr"]  # alpha follows the rule unless searched


def test_grid_search_runs_every_point_in_a_seeded_shuffled_order():
    cfg = _cfg(search="grid", ranks=[4, 8, 16, 32], lr_grid=[1e-4, 3e-4], alphas=[8, 16], num_samples=2)
    points = grid_points(cfg)
    every = [
        {"lora.r": r, "train.lr": lr, "lora.alpha": a} for r in [4, 8, 16, 32] for lr in [1e-4, 3e-4] for a in [8, 16]
    ]
    key = lambda p: (p["lora.r"], p["train.lr"], p["lora.alpha"])  # noqa: E731
    assert trial_count(cfg) == len(points) == 32
    assert sorted(points[:16], key=key) == every and sorted(points[16:], key=key) == every  # each round whole
    assert points[:16] != every and points[:16] != points[16:]  # not in written order, rounds differ
    assert grid_points(cfg) == points  # seeded by train.seed: a rerun (or resume) sees the same order
    assert searcher(cfg, 2).max_concurrent == 2
    space = param_space(cfg)
    assert space["lora.r"].categories == [4, 8, 16, 32] and space["train.lr"].categories == [1e-4, 3e-4]
    assert trial_count(_cfg(num_samples=5)) == 5 and grid_points(_cfg(ranks=[8], lr_grid=[1e-4], num_samples=1)) == [
        {"lora.r": 8, "train.lr": 1e-4}
    ]


def test_a_trial_config_applies_rank_lr_and_the_alpha_rule():
    base = _cfg(alpha_per_rank=2)
    cfg = trial_config(base, {"lora.r": 32, "train.lr": 3e-4})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.lr, cfg.lora.dropout) == (32, 64, 3e-4, base.lora.dropout)
    searched = trial_config(base, {"lora.r": 8, "train.lr": 1e-4, "lora.alpha": 24, "lora.dropout": 0.1})
    assert (searched.lora.alpha, searched.lora.dropout) == (24, 0.1)
    assert trial_config(base, {"train.lr": 1e-4}).lora.alpha == base.lora.alpha  # no rank searched, no rule
    with pytest.raises(ConfigError, match=r"lora\.rank: unknown key; did you mean lora\.r\?"):
        trial_config(base, {"lora.rank": 8})
    with pytest.raises(ConfigError, match=r"lora\.dropout: Input should be less than 1"):
        trial_config(base, {"lora.dropout": 1.5})


@pytest.mark.parametrize(
    ("overrides", "cluster", "per_worker", "concurrent"),
    [
        # one worker: the trial's actor trains, and has the trial's resources
        ({"train": {"cpus_per_worker": 2}}, {"CPU": 2}, {"CPU": 2}, 1),
        ({"sweep": {"cpus_per_trial": 1}}, {"CPU": 2}, {"CPU": 1}, 2),
        ({"sweep": {"cpus_per_trial": 1, "max_concurrent_trials": 1}}, {"CPU": 8}, {"CPU": 1}, 1),
        ({"train": {"use_gpu": True, "cpus_per_worker": 1}, "sweep": {"gpus_per_trial": 0.5}},
         {"CPU": 16, "GPU": 1}, {"CPU": 1, "GPU": 0.5}, 2),
        # several: a TorchTrainer per trial, its driver function's share taken from the trial's CPUs
        ({"train": {"num_workers": 2}, "sweep": {"cpus_per_trial": 2}}, {"CPU": 4}, {"CPU": 0.995}, 2),
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


def _domains(space):
    """A Tune param space as comparable data: each domain's kind, values or bounds, and sampler."""
    return {
        key: (type(d).__name__, getattr(d, "categories", None), getattr(d, "lower", None), getattr(d, "upper", None),
              type(d.get_sampler()).__name__)
        for key, d in space.items()
    }  # fmt: skip


def test_the_shorthand_and_the_same_explicit_space_search_the_same_trials():
    shorthand = _cfg(ranks=[4, 8], lr_min=1e-5, lr_max=1e-3, alphas=[8, 16], dropouts=[0.0, 0.1])
    explicit = _cfg(
        space={  # written in another order: the space's order does not depend on it
            "lora.dropout": {"values": [0.0, 0.1]},
            "train.lr": {"min": 1e-5, "max": 1e-3, "log": True},
            "lora.alpha": {"values": [8, 16]},
            "lora.r": {"values": [4, 8]},
        }
    )
    domains = _domains(param_space(explicit))
    assert list(domains) == ["lora.r", "train.lr", "lora.alpha", "lora.dropout"]
    assert domains == _domains(param_space(shorthand)) and domains["train.lr"][-1] == "_LogUniform"

    grid = {"search": "grid", "num_samples": 2}
    shorthand = _cfg(**grid, ranks=[4, 8], lr_grid=[1e-4, 3e-4], alphas=[8, 16])
    explicit = _cfg(**grid, space={"lora.alpha": {"values": [8, 16]}, "train.lr": {"values": [1e-4, 3e-4]},
                                   "lora.r": {"values": [4, 8]}})  # fmt: skip
    points = grid_points(shorthand)
    assert len(points) == 16 and grid_points(explicit) == points  # the same points in the same seeded order
    for params in points:
        a, b = trial_config(shorthand, params), trial_config(explicit, params)
        assert (a.lora, a.train) == (b.lora, b.train)
        assert (a.lora.r, a.lora.alpha, a.train.lr) == (params["lora.r"], params["lora.alpha"], params["train.lr"])
    # Without alphas or lora.alpha, the alpha rule holds for a rank searched either way.
    derived = trial_config(_cfg(alpha_per_rank=3, space={"lora.r": {"values": [4, 8]}}), {"lora.r": 8})
    assert derived.lora.alpha == 24


def test_keys_no_shorthand_covers_reach_the_trial_configs_through_tune():
    from ray.tune.experiment import Experiment

    modules = {"lora.target_modules": {"values": [["q_proj", "v_proj"], "all-linear"]}}
    cfg = _cfg(search="grid", ranks=[8], lr_grid=[1e-4], num_samples=1,
               space={"train.warmup_ratio": {"values": [0.0, 0.2]}, **modules})  # fmt: skip
    assert trial_count(cfg) == 4
    # Tune's own variant generator, as the sweep builds it, turns the grid points into trial configs.
    generator = searcher(cfg, 4)
    generator.add_configurations([Experiment("space", run=lambda config: None, config=param_space(cfg), num_samples=4)])
    trials = [generator.next_trial() for _ in range(4)]
    configs = [trial_config(cfg, trial.config) for trial in trials]
    assert sorted((c.train.warmup_ratio, json.dumps(c.lora.target_modules)) for c in configs) == [
        (0.0, '"all-linear"'), (0.0, '["q_proj", "v_proj"]'), (0.2, '"all-linear"'), (0.2, '["q_proj", "v_proj"]')
    ]  # fmt: skip
    assert {(c.lora.r, c.lora.alpha, c.train.lr) for c in configs} == {(8, 16, 1e-4)}

    drawn = _cfg(space={"train.warmup_ratio": {"min": 0.05, "max": 0.1}, **modules})
    space = param_space(drawn)
    for seed in range(5):
        cfg = trial_config(drawn, {key: domain.sample(random_state=seed) for key, domain in space.items()})
        assert 0.05 <= cfg.train.warmup_ratio < 0.1 and cfg.lora.target_modules in (["q_proj", "v_proj"], "all-linear")


def test_a_grid_over_two_keys_runs_their_cartesian_product():
    space = {"train.warmup_ratio": {"values": [0.0, 0.1, 0.2]}, "lora.dropout": {"values": [0.0, 0.1]}}
    cfg = _cfg(search="grid", ranks=[8], lr_grid=[1e-4], num_samples=2, space=space)
    points = grid_points(cfg)
    assert trial_count(cfg) == len(points) == 2 * 3 * 2
    pairs = {(p["train.warmup_ratio"], p["lora.dropout"]) for p in points}
    assert pairs == set(itertools.product([0.0, 0.1, 0.2], [0.0, 0.1]))
    assert trial_count(_cfg(num_samples=3, space=space)) == 3  # random search draws num_samples, grid or not
    with pytest.raises(SweepError, match=r"train\.warmup_ratio has a range"):
        grid_points(_cfg(space={"train.warmup_ratio": {"min": 0.0, "max": 0.2}}))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lora.rank": {"values": [8]}}, r"sweep\.space\.lora\.rank: unknown config key; did you mean lora\.r\?"),
        ({"train.learning_rate": {"values": [1e-4]}}, r"sweep\.space\.train\.learning_rate: unknown config key; did you mean train\.lr\?"),
        ({"train.warmup_ration": {"values": [0.1]}}, r"did you mean train\.warmup_ratio\?"),
        ({"lora.r": {"values": [8, 2048]}}, r"sweep\.space\.lora\.r\.values: 2048 is not a valid lora\.r \(Input should be less than or equal to 1024\)"),
        ({"lora.bias": {"values": ["none", "some"]}}, r"'some' is not a valid lora\.bias"),
        ({"lora.r": {"min": 4, "max": 64}}, r"sweep\.space\.lora\.r: not a float setting: list its values"),
        ({"train.warmup_ratio": {"min": 0.0, "max": 1.0}}, r"1\.0 is not a valid train\.warmup_ratio \(Input should be less than 1\)"),
        ({"train.lr": {"min": 1e-3, "max": 1e-5, "log": True}}, r"sweep\.space\.train\.lr: min \(0\.001\) must be below max"),
        ({"train.lr": {"min": 0.0, "max": 1e-3, "log": True}}, r"log needs min above 0"),
        ({"lora.dropout": {"values": [0.1], "min": 0.0}}, r"give either values or a range"),
        ({"lora.dropout": {"value": [0.1]}}, r"sweep\.space\.lora\.dropout\.value: unknown key"),
        ({"data.path": {"values": ["a.jsonl", "b.jsonl"]}}, r"sweep\.space\.data\.path: cannot vary between trials \(data settings hold"),
        ({"train.batch_size": {"values": [2, 4]}}, r"sweep\.space\.train\.batch_size: cannot vary between trials \(every trial runs the same number of optimizer steps"),
    ],
)  # fmt: skip
def test_a_bad_space_is_a_config_error_naming_the_key(space, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(space=space)


def test_space_problems_come_at_once_and_a_changed_shorthand_for_the_same_key_is_refused():
    with pytest.raises(ConfigError) as caught:
        _cfg(space={"lora.rank": {"values": [8]}, "train.lr": {"values": [2.0]}, "lora.dropout": {"values": [0.1]}})
    assert [p.split(":")[0] for p in caught.value.problems] == ["sweep.space.lora.rank", "sweep.space.train.lr.values"]
    with pytest.raises(ConfigError, match=r"sweep: space and ranks both search lora\.r: keep one"):
        _cfg(ranks=[4, 8], space={"lora.r": {"values": [4]}})
    with pytest.raises(ConfigError, match=r"space and lr_min both search train\.lr"):
        _cfg(lr_min=1e-5, space={"train.lr": {"min": 1e-4, "max": 1e-3}})
    with pytest.raises(ConfigError, match=r"search: grid needs values for train\.warmup_ratio, not a range"):
        _cfg(search="grid", space={"train.warmup_ratio": {"min": 0.0, "max": 0.2}})
    # A shorthand left at its default gives way to the space's entry for its key.
    assert param_space(_cfg(space={"lora.r": {"values": [4]}}))["lora.r"].categories == [4]


def test_space_keys_can_be_set_from_the_command_line_and_survive_the_trip_to_a_trial():
    cfg = load_config(None, ["sweep.search=grid", "sweep.space.train.lr.values=[1e-4,3e-4]",
                             "sweep.space.train.warmup_ratio.values=[0,0.1]"])  # fmt: skip
    assert cfg.sweep.space["train.lr"].values == [1e-4, 3e-4]  # YAML reads 1e-4 as text; checked as an lr, a float
    assert cfg.sweep.space["train.warmup_ratio"].values == [0.0, 0.1]
    assert from_dict(cfg.model_dump()) == cfg  # as each trial re-validates the config it is shipped


def test_describe_the_report_and_the_record_show_the_searched_keys(tmp_path):
    from tune.sweep import _record

    base = _cfg(space={"train.warmup_ratio": {"values": [0.0, 0.2]},
                       "lora.target_modules": {"values": [["q_proj", "v_proj"], "all-linear"]}})  # fmt: skip
    params = {"lora.r": 8, "train.lr": 1e-4, "train.warmup_ratio": 0.2, "lora.target_modules": '["q_proj", "v_proj"]'}
    assert (
        describe(params, base)
        == 'r=8 alpha=16 lr=1.00e-04 train.warmup_ratio=0.2 lora.target_modules=["q_proj", "v_proj"]'
    )
    assert describe({"lora.r": 4, "train.lr": 2e-4, "lora.dropout": 0.1}, base) == "r=4 alpha=8 lr=2.00e-04 dropout=0.1"

    result = SimpleNamespace(config=params, metrics={}, metrics_dataframe=None, best_checkpoints=[], error=None,
                             path="/runs/s/trial_7")
    record = _record(result, base, total=10)
    assert (record.trial_id, record.r, record.alpha, record.lr, record.params) == ("trial_7", 8, 16, 1e-4, params)
    assert trial_config(base, record.params).lora.target_modules == ["q_proj", "v_proj"]  # how the best is registered
    assert record.label == 'r=8 lr=1.0e-04 train.warmup_ratio=0.2 lora.target_modules=["q_proj", "v_proj"]'

    other = report.TrialRecord("t2", 16, 32, 5e-4, 0.05, "finished", 10, 3.2, [(10, 3.2)], "/ckpt/2",
                               params={"lora.r": 16, "train.lr": 5e-4, "train.warmup_ratio": 0.0})  # fmt: skip
    lines = report.table([other, record], "val_loss", "t2").splitlines()
    assert lines[0].split() == ["trial", "rank", "alpha", "lr", "dropout", "train.warmup_ratio", "lora.target_modules",
                                "steps", "best", "val_loss", "status"]  # fmt: skip
    assert lines[1].split()[:8] == ["*", "t2", "16", "32", "5.00e-04", "0.05", "0", "-"]
    report.write([other, record], tmp_path, "val_loss", "t2")
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [(r["r"], r["train.warmup_ratio"], r["lora.target_modules"]) for r in rows] == [
        ("16", "0.0", ""), ("8", "0.2", '["q_proj", "v_proj"]')
    ]  # fmt: skip
    saved = json.loads((tmp_path / "trials.json").read_text())
    assert saved["trials"][1]["params"] == params


def test_the_sweep_is_checked_at_the_largest_rank_it_searches(monkeypatch):
    from tune import sweep

    assert peak_params(_cfg(ranks=[16, 64, 8])) == {"lora.r": 64}
    cfg = _cfg(space={"lora.r": {"values": [4, 32, 8]}})
    monkeypatch.setattr(sweep, "prepare_run", lambda checked: (checked, None))
    prepared, _ = sweep.prepare_sweep(cfg)
    assert (prepared.lora.r, prepared.lora.alpha) == (32, 64)


def test_a_sweep_saved_before_sweep_space_still_resumes():
    """Its saved config lacks sweep.space (the default counts) and its trials carry r/lr/alpha/dropout."""
    from qlora_ray.config import changed_keys

    cfg = load_config(None, ["sweep.ranks=[4,8]"])
    saved = cfg.model_dump()
    del saved["sweep"]["space"]
    assert changed_keys(saved, cfg.model_dump()) == []
    saved["sweep"]["ranks"] = [2]
    assert changed_keys(saved, cfg.model_dump()) == ["sweep.ranks"]
    old = trial_config(cfg, {"r": 8, "lr": 1e-4, "alpha": 4.0, "dropout": 0.1})
    assert (old.lora.r, old.train.lr, old.lora.alpha, old.lora.dropout) == (8, 1e-4, 4.0, 0.1)


def test_every_searched_target_set_is_checked_before_the_sweep(tiny_phi_dir):
    from jobs.preflight import PreflightError
    from tune.sweep import _check_searched_targets

    good = load_config(None, [f"model.name_or_path={tiny_phi_dir}", "sweep.space.lora.target_modules.values=[[q_proj],[dense,fc1]]"])
    _check_searched_targets(good)  # both sets name modules phi-2 has
    bad = load_config(None, [f"model.name_or_path={tiny_phi_dir}", "sweep.space.lora.target_modules.values=[[q_proj],[o_proj]]"])
    with pytest.raises(PreflightError, match=r"lora.target_modules \['o_proj'\]") as err:
        _check_searched_targets(bad)
    assert "['q_proj']" not in str(err.value)
