from pathlib import Path

import pytest

from qlora_ray import metrics
from qlora_ray.config import Config, ConfigError, from_dict, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.run.name


def test_shipped_recipes_match_the_seed_recipes():
    galaxy = load_config(REPO / "configs/galaxy-phi2.yaml")
    assert (galaxy.lora.r, galaxy.lora.alpha, galaxy.lora.dropout) == (32, 64, 0.1)
    assert galaxy.lora.target_modules == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    assert (galaxy.train.batch_size, galaxy.train.grad_accum, galaxy.train.epochs) == (4, 4, 3)
    assert (galaxy.train.optimizer, galaxy.train.max_grad_norm, galaxy.train.lr) == ("paged_adamw_8bit", 0.3, 2e-4)
    hea = load_config(REPO / "configs/hea-phi2.yaml")
    assert "o_proj" not in hea.lora.target_modules and "dense" in hea.lora.target_modules
    assert (hea.lora.r, hea.lora.alpha, hea.data.template) == (8, 16, "{context}\nQuestion: {question}\nAnswer:")


def test_overrides_parse_numbers_lists_and_booleans(tmp_path):
    cfg = load_config(
        REPO / "configs/quickstart.yaml",
        ["train.lr=1e-4", "lora.target_modules=[q_proj,v_proj]", "train.use_gpu=true", "lora.r=8"],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.use_gpu is True and cfg.lora.r == 8


def test_all_problems_are_reported_at_once_with_paths_and_fixes(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  quantization: nf8\nlora:\n  rank: 8\ntrian:\n  lr: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.lr=abc", "nonsense"])
    problems = info.value.problems
    text = str(info.value)
    assert len(problems) == 5, text
    assert "model.quantization" in text and "'nf4' or 'none'" in text
    assert "lora.rank: unknown key; did you mean lora.r?" in text
    assert "trian: unknown key; did you mean train?" in text
    assert "train.lr" in text and "valid number" in text
    assert "'nonsense' is not of the form section.key=value" in text
    assert str(path) in text


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        from_dict({"data": {"zzzzzz": 1}})
    assert "valid keys of data:" in str(info.value) and "holdout_fraction" in str(info.value)


def test_modules_to_save_needs_explicit_permission():
    with pytest.raises(ConfigError, match="allow_modules_to_save"):
        from_dict({"lora": {"modules_to_save": ["lm_head"]}})
    cfg = from_dict({"lora": {"modules_to_save": ["lm_head"], "allow_modules_to_save": True}})
    assert cfg.lora.modules_to_save == ["lm_head"]


def test_template_with_unknown_field_is_rejected():
    with pytest.raises(ConfigError, match=r"data.template: .*\{context\} and \{question\}"):
        from_dict({"data": {"template": "{passage} Q: {question}"}})


def test_config_round_trips_as_a_plain_dict():
    cfg = load_config(REPO / "configs/galaxy-phi2.yaml")
    assert from_dict(cfg.model_dump()) == cfg


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("name", ["metric", *metrics.names()])
def test_rank_by_takes_metric_or_any_name_of_the_metrics_table(name):
    assert from_dict({"sweep": {"rank_by": name}}).sweep.rank_by == name


@pytest.mark.parametrize("name", ["f1", "Token_F1", "val_loss"])
def test_rank_by_names_itself_and_the_valid_metrics_when_wrong(name):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"sweep.rank_by={name}"])
    (problem,) = info.value.problems
    assert problem.startswith(f"sweep.rank_by: {name!r} is neither 'metric' nor an answer metric")
    assert "use one of: metric, " + ", ".join(metrics.names()) in problem
