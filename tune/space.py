"""The sweep's search space, searcher and scheduler, all read from the config's ``sweep`` section.

The space maps dotted config keys (``lora.r``, ``train.lr``, ``train.warmup_ratio``, ...) to their domains:
``sweep.space`` as written, plus what the shorthand fields (``ranks``, ``lr_min``/``lr_max`` or ``lr_grid``,
``alphas``, ``dropouts``) expand into for the keys that ``sweep.space`` leaves out. A trial's parameters are a flat
dict of those keys (Tune's ``param_space`` and trial configs use the dotted strings as they are);
:func:`trial_config` sets them on the base config, which the train job's code then consumes unchanged.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

from qlora_ray.config import SWEEP_SHORTHAND, Config, ConfigError, SearchDomain, from_dict
from qlora_ray.errors import QloraRayError
from tune.report import SHOWN, format_value


class SweepError(QloraRayError, RuntimeError):
    """A sweep that cannot start or did not finish; the message says why and what to do."""


def search_space(cfg: Config, grid: bool | None = None) -> dict[str, SearchDomain]:
    """Every searched key and its domain: ``sweep.space``, and the shorthand fields for the keys it leaves out.

    The shorthand's keys come first, in a fixed order (rank, lr, alpha, dropout), then the others as written: the
    grid's seeded shuffle depends on the order of its axes, so a space written either way runs the same trials.

    Args:
        cfg: the sweep's config.
        grid: whether the shorthand's lr is ``lr_grid`` (else log-uniform in ``[lr_min, lr_max]``); by default,
            whether ``sweep.search`` is ``grid``.
    """
    sweep = cfg.sweep
    grid = sweep.search == "grid" if grid is None else grid
    lr = SearchDomain(values=sweep.lr_grid) if grid else SearchDomain(min=sweep.lr_min, max=sweep.lr_max, log=True)
    shorthand = {"lora.r": SearchDomain(values=sweep.ranks), "train.lr": lr}
    if sweep.alphas:
        shorthand["lora.alpha"] = SearchDomain(values=sweep.alphas)
    if sweep.dropouts:
        shorthand["lora.dropout"] = SearchDomain(values=sweep.dropouts)
    merged = {**shorthand, **sweep.space}
    order = [key for key in SWEEP_SHORTHAND if key in merged] + [key for key in merged if key not in SWEEP_SHORTHAND]
    return {key: merged[key] for key in order}


def tune_value(value: Any) -> Any:
    """A value as Tune carries it: lists and mappings (``lora.target_modules: [q_proj, v_proj]``) as JSON text.

    Tune's variant generator descends into list values of preset points (the grid's), so they would not survive it.
    """
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)


def param_space(cfg: Config) -> dict[str, Any]:
    """Tune's ``param_space``: a choice among the values, or a (log-)uniform float, for every searched key."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, domain in search_space(cfg).items():
        if domain.values is not None:
            space[key] = tune.choice([tune_value(v) for v in domain.values])
        else:
            space[key] = (tune.loguniform if domain.log else tune.uniform)(domain.min, domain.max)
    return space


def grid_points(cfg: Config) -> list[dict[str, Any]]:
    """Every grid point, ``sweep.num_samples`` times over, each round in its own seeded random order.

    A grid in its written order (ranks ascending) tends to bring each trial in better than the ones before;
    asynchronous early stopping compares a trial only with those that reached its rung first, so a sorted
    grid would let almost every trial through. A shuffled order gives the scheduler its fair comparisons.
    """
    space = search_space(cfg, grid=True)
    ranges = [key for key, domain in space.items() if domain.values is None]
    if ranges:  # config validation refuses these with search: grid; asked for the grid of another search
        raise SweepError(f"a grid needs values for every key; {', '.join(ranges)} has a range (min, max)")
    axes = {key: [tune_value(v) for v in domain.values] for key, domain in space.items()}
    grid = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    rng = random.Random(cfg.train.seed)
    points = []
    for _ in range(cfg.sweep.num_samples):
        points += rng.sample(grid, len(grid))
    return points


def trial_count(cfg: Config) -> int:
    """How many trials the sweep runs: ``num_samples`` draws, or every grid point ``num_samples`` times."""
    return len(grid_points(cfg)) if cfg.sweep.search == "grid" else cfg.sweep.num_samples


def peak_params(cfg: Config) -> dict[str, Any]:
    """The parameters of the trial that needs the most memory, as far as the space tells: the largest rank searched."""
    ranks = search_space(cfg).get("lora.r")
    return {"lora.r": max(ranks.values)} if ranks is not None and ranks.values else {}


# The names trials of sweeps started before sweep.space carry in their Tune configs: a resumed one keeps them.
_EARLIER_NAMES = {"r": "lora.r", "lr": "train.lr", "alpha": "lora.alpha", "dropout": "lora.dropout"}


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The run config of one trial: ``base`` with each searched key of ``params`` set, validated again.

    Unless ``lora.alpha`` is searched, a searched rank brings its alpha with it: ``sweep.alpha_per_rank`` x r.

    Raises:
        ConfigError: a key that is not a config key, or a value the key does not take, named.
    """
    raw = base.model_dump()
    space = search_space(base)
    params = {_EARLIER_NAMES.get(key, key): value for key, value in params.items()}
    for key, value in params.items():
        domain = space.get(key)
        if isinstance(value, str) and domain is not None and domain.values is not None:
            value = {tune_value(v): v for v in domain.values}.get(value, value)  # Tune's JSON text back to the value
        _set(raw, key, value)
    cfg = from_dict(raw, source="sweep trial")
    if "lora.r" in params and "lora.alpha" not in params:
        raw["lora"]["alpha"] = base.sweep.alpha_per_rank * cfg.lora.r
        cfg = from_dict(raw, source="sweep trial")
    return cfg


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` in a dumped config; :func:`from_dict` then names a key that does not exist."""
    *sections, name = key.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError("sweep trial", [f"{key}: {section} is a value, not a section"])
    node[name] = value


def describe(params: dict[str, Any], base: Config) -> str:
    """``r=16 alpha=32 lr=2.10e-04 train.warmup_ratio=0.1``: a trial's hyperparameters in one short string.

    Rank, alpha and lr are always shown (alpha may follow the rank), dropout when searched, other searched keys as
    ``key=value``.
    """
    cfg = trial_config(base, params)
    text = f"r={cfg.lora.r} alpha={cfg.lora.alpha:g} lr={cfg.train.lr:.2e}"
    text += f" dropout={cfg.lora.dropout:g}" if "lora.dropout" in params else ""
    return text + "".join(f" {key}={format_value(value)}" for key, value in params.items() if key not in SHOWN)


def searcher(cfg: Config, max_concurrent: int) -> Any:
    """Tune's variant generator (random draws, or the grid's points in shuffled order) or Optuna's TPE.

    Either runs at most ``max_concurrent`` trials at once (Tune applies its own ``max_concurrent_trials`` to
    neither a variant generator passed in nor an already limited searcher).
    """
    if cfg.sweep.search != "optuna":
        from ray.tune.search import BasicVariantGenerator

        points = grid_points(cfg) if cfg.sweep.search == "grid" else None
        return BasicVariantGenerator(
            points_to_evaluate=points, max_concurrent=max_concurrent, random_state=cfg.train.seed
        )
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(metric=cfg.sweep.metric, mode=cfg.sweep.mode, seed=cfg.train.seed)
    except (ImportError, AssertionError):  # Ray asserts that optuna is importable when the searcher is built
        raise SweepError(
            "sweep.search: optuna needs the optuna package: pip install 'qlora-ray[optuna]' "
            "(or set sweep.search: random)"
        ) from None
    return ConcurrencyLimiter(optuna, max_concurrent=max_concurrent)


def scheduler(cfg: Config, total_steps: int) -> Any:
    """ASHA on the holdout metric, in optimizer steps, or None with ``sweep.early_stopping: false``."""
    if not cfg.sweep.early_stopping:
        return None
    from ray.tune.schedulers import ASHAScheduler

    grace = cfg.sweep.grace_period or cfg.train.eval_every or total_steps
    return ASHAScheduler(
        time_attr="step",
        max_t=total_steps,
        grace_period=min(grace, total_steps),
        reduction_factor=cfg.sweep.reduction_factor,
    )
