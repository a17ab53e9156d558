"""The sweep's search space, searcher and scheduler, all read from the config's ``sweep`` section.

A trial's parameters are a small dict (``r``, ``lr`` and, when searched, ``alpha`` and ``dropout``);
:func:`trial_config` turns them into the full run config that the train job's code consumes unchanged.
"""

from __future__ import annotations

from typing import Any

from jobs.config import Config, from_dict


class SweepError(RuntimeError):
    """A sweep that cannot start or did not finish; the message says why and what to do."""


def param_space(cfg: Config) -> dict[str, Any]:
    """Tune's ``param_space``: choices and a log-uniform lr, or grid searches with ``sweep.search: grid``."""
    from ray import tune

    sweep = cfg.sweep
    grid = sweep.search == "grid"
    pick = tune.grid_search if grid else tune.choice
    space: dict[str, Any] = {
        "r": pick(sweep.ranks),
        "lr": tune.grid_search(sweep.lr_grid) if grid else tune.loguniform(sweep.lr_min, sweep.lr_max),
    }
    if sweep.alphas:
        space["alpha"] = pick(sweep.alphas)
    if sweep.dropouts:
        space["dropout"] = pick(sweep.dropouts)
    return space


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


def searcher(cfg: Config) -> Any:
    """None (Tune's random/grid variant generator) or Optuna's TPE."""
    if cfg.sweep.search != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=cfg.sweep.metric, mode=cfg.sweep.mode, seed=cfg.train.seed)
    except (ImportError, AssertionError):  # Ray asserts that optuna is importable when the searcher is built
        raise SweepError(
            "sweep.search: optuna needs the optuna package: pip install 'qlora-ray[optuna]' "
            "(or set sweep.search: random)"
        ) from None


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
