"""The sweep's search space, searcher and scheduler, all read from the config's ``sweep`` section.

A trial's parameters are a small dict (``r``, ``lr`` and, when searched, ``alpha`` and ``dropout``);
:func:`trial_config` turns them into the full run config that the train job's code consumes unchanged.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from qlora_ray.config import Config, from_dict
from qlora_ray.errors import QloraRayError


class SweepError(QloraRayError, RuntimeError):
    """A sweep that cannot start or did not finish; the message says why and what to do."""


def param_space(cfg: Config) -> dict[str, Any]:
    """Tune's ``param_space``: rank (and alpha, dropout) choices and a log-uniform or grid lr."""
    from ray import tune

    sweep = cfg.sweep
    grid = sweep.search == "grid"
    space: dict[str, Any] = {
        "r": tune.choice(sweep.ranks),
        "lr": tune.choice(sweep.lr_grid) if grid else tune.loguniform(sweep.lr_min, sweep.lr_max),
    }
    if sweep.alphas:
        space["alpha"] = tune.choice(sweep.alphas)
    if sweep.dropouts:
        space["dropout"] = tune.choice(sweep.dropouts)
    return space


def grid_points(cfg: Config) -> list[dict[str, Any]]:
    """Every grid point, ``sweep.num_samples`` times over, each round in its own seeded random order.

    A grid in its written order (ranks ascending) tends to bring each trial in better than the ones before;
    asynchronous early stopping compares a trial only with those that reached its rung first, so a sorted
    grid would let almost every trial through. A shuffled order gives the scheduler its fair comparisons.
    """
    sweep = cfg.sweep
    axes: dict[str, list[Any]] = {"r": sweep.ranks, "lr": sweep.lr_grid}
    if sweep.alphas:
        axes["alpha"] = sweep.alphas
    if sweep.dropouts:
        axes["dropout"] = sweep.dropouts
    grid = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    rng = random.Random(cfg.train.seed)
    points = []
    for _ in range(sweep.num_samples):
        points += rng.sample(grid, len(grid))
    return points


def trial_count(cfg: Config) -> int:
    """How many trials the sweep runs: ``num_samples`` draws, or every grid point ``num_samples`` times."""
    return len(grid_points(cfg)) if cfg.sweep.search == "grid" else cfg.sweep.num_samples


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The run config of one trial: ``base`` with the trial's rank, alpha, learning rate and dropout."""
    raw = base.model_dump()
    r = int(params["r"])
    raw["lora"]["r"] = r
    raw["lora"]["alpha"] = float(params.get("alpha", base.sweep.alpha_per_rank * r))
    raw["train"]["lr"] = float(params["lr"])
    if "dropout" in params:
        raw["lora"]["dropout"] = float(params["dropout"])
    return from_dict(raw, source="sweep trial")


def describe(params: dict[str, Any], base: Config) -> str:
    """``r=16 alpha=32 lr=2.1e-04``: a trial's hyperparameters in one short string."""
    cfg = trial_config(base, params)
    text = f"r={cfg.lora.r} alpha={cfg.lora.alpha:g} lr={cfg.train.lr:.2e}"
    return text + (f" dropout={cfg.lora.dropout:g}" if "dropout" in params else "")


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
