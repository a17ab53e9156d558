"""Ray Tune sweep over LoRA rank and learning rate: ``python -m tune.sweep --config PATH [key=value ...]``.

Every trial runs the train job's own loop (:func:`jobs.train.run_loop`) and reports each evaluation to Tune,
so ASHA stops trials on their intermediate holdout loss. A trial with ``train.num_workers: 1`` trains inside
its Tune actor, which keeps its base model for the next trial (:mod:`tune.trial`); one with several workers
builds the same Ray Train ``TorchTrainer`` as ``python -m jobs.train`` and relays its reports through
``TuneReportCallback``. Data is checked and tokenised once, in this driver, and shared with every trial
through the object store.

Layout under ``<run.storage_path>/<run.name>/``: Tune's results (one directory per trial with
``progress.csv``, ``result.json``, TensorBoard event files and a one-worker trial's checkpoints),
``train_runs/<trial id>/`` (a multi-worker trial's Ray Train checkpoints), and ``report/`` (``trials.csv``,
``trials.json``, ``sweep.png``). The best trial's
adapter is registered in ``run.registry`` under ``run.name``. Rerunning the same command after the driver
died resumes the sweep: finished trials are kept, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune
import yaml

from jobs.export import register_checkpoint, registered_by
from jobs.loop import STATE_FILE
from jobs.preflight import PreflightError, PreflightResult, prepare_run
from jobs.train import build_trainer
from qlora_ray import cli
from qlora_ray.config import Config, changed_keys, from_dict
from qlora_ray.console import clock
from qlora_ray.model import ModelError, model_skeleton, resolve_targets
from qlora_ray.runtime import failure_summary, start_ray, storage_path
from qlora_ray.storage import filesystem_of, is_uri, read_text, upload_dir, write_text
from tune import report
from tune.space import (
    SweepError,
    describe,
    param_space,
    peak_params,
    scheduler,
    search_space,
    searcher,
    trial_config,
    trial_count,
)
from tune.trial import train_in_trial

log = logging.getLogger(__name__)

TRAIN_RUNS = "train_runs"
REPORT_DIR = "report"
SWEEP_CONFIG = "qlora_ray_sweep.yaml"  # the config the sweep started with: a resume must match it


@dataclass
class SweepOutcome:
    records: list[report.TrialRecord]
    best: report.TrialRecord
    adapter: str  # the registered adapter's location
    registry_name: str
    report_dir: str  # trials.csv, trials.json, sweep.png
    path: str  # the Tune experiment directory
    metric: str


def run_trial(params: dict[str, Any], base: dict[str, Any], train_rows: list, holdout_rows: list, storage: str,
              resources: dict[str, float]) -> None:  # fmt: skip
    """One trial (runs in a Tune actor) with this trial's hyperparameters: in the actor itself with one worker
    (:mod:`tune.trial`), else the train job's ``TorchTrainer`` with ``resources`` per worker."""
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(from_dict(base, source="sweep"), params)
    if cfg.train.num_workers == 1:
        train_in_trial(cfg, train_rows, holdout_rows)
        return
    trainer = build_trainer(
        cfg, train_rows, holdout_rows, f"{storage}/{cfg.run.name}/{TRAIN_RUNS}",
        ray.tune.get_context().get_trial_id(), callbacks=[TuneReportCallback()], resources=resources,
        step_lines=False,
    )  # fmt: skip
    try:
        trainer.fit()  # same storage and name after a restart: Ray Train resumes from the latest checkpoint
    except ray.train.TrainingFailedError as err:
        raise SweepError(failure_summary(err)) from None


def prepare_sweep(cfg: Config) -> tuple[Config, PreflightResult]:
    """:func:`jobs.preflight.prepare_run` for a sweep: checked at the largest ``lora.r`` its space searches, so that
    the memory estimate holds for every trial, and every searched ``lora.target_modules`` checked against the model
    before any trial starts. Each trial sets its own searched keys on top of the config returned."""
    prepared = prepare_run(trial_config(cfg, peak_params(cfg)))
    _check_searched_targets(cfg)
    return prepared


def _check_searched_targets(cfg: Config) -> None:
    """Each searched ``lora.target_modules`` value must match modules of the model (as preflight checks one)."""
    domain = search_space(cfg).get("lora.target_modules")
    if domain is None or not domain.values:
        return
    skeleton = model_skeleton(cfg.model)
    problems = []
    for targets in domain.values:
        try:
            resolve_targets(skeleton, trial_config(cfg, {"lora.target_modules": targets}).lora, cfg.model.name_or_path)
        except ModelError as err:
            problems.append(f"sweep.space lora.target_modules {targets!r}: {err}")
    if problems:
        raise PreflightError("the sweep cannot start:\n" + "\n".join(f"- {p}" for p in problems))


def run_sweep(
    cfg: Config, prepared: tuple[Config, PreflightResult] | None = None, callbacks: Sequence[Any] = ()
) -> SweepOutcome:
    """Check the data once, run (or resume) the sweep, report it, and register the best adapter.

    ``prepared``: what :func:`prepare_sweep` returned for ``cfg``, when the caller ran it already.
    ``callbacks``: more ``ray.tune.Callback`` objects for the sweep (a new one, not a resumed one).
    """
    cfg, check = prepared or prepare_sweep(cfg)
    assert check.data is not None
    ray = start_ray()
    storage = storage_path(cfg, ray)
    resources, concurrency = trial_resources(cfg, ray.cluster_resources())
    total = check.optimizer_steps
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial, base=cfg.model_dump(), train_rows=check.data.train_rows,
            holdout_rows=check.data.holdout_rows, storage=storage, resources=resources,
        ),
        resources if cfg.train.num_workers == 1 else {"CPU": DRIVER_CPUS},
    )  # fmt: skip
    path = f"{storage.rstrip('/')}/{cfg.run.name}"
    registered_by(cfg, path)  # a registry name another run holds: refused now, not after the sweep
    leftovers = [p for p in Path(path).glob("*") if p.name != SWEEP_CONFIG] if not is_uri(path) else []
    resuming = ray.tune.Tuner.can_restore(path)
    if leftovers and not resuming:
        raise SweepError(
            f"{path} exists but holds no sweep (a train run with the same run.name?): give the sweep its own "
            "run.name, e.g. run.name=" + cfg.run.name + "-sweep"
        )
    if resuming:
        _check_same_sweep(path, cfg)
        log.info("resuming the sweep at %s: finished trials are kept, unfinished ones continue", path)
        tuner = ray.tune.Tuner.restore(path, trainable, resume_unfinished=True, param_space=param_space(cfg))
    else:
        write_text(f"{path}/{SWEEP_CONFIG}", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=ray.tune.TuneConfig(
                metric=cfg.sweep.metric, mode=cfg.sweep.mode, num_samples=trial_count(cfg),
                scheduler=scheduler(cfg, total), search_alg=searcher(cfg, concurrency), reuse_actors=True,
            ),
            run_config=ray.tune.RunConfig(
                name=cfg.run.name, storage_path=storage, verbose=0,
                failure_config=ray.tune.FailureConfig(max_failures=cfg.sweep.max_retries),
                checkpoint_config=ray.tune.CheckpointConfig(
                    num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=cfg.sweep.metric,
                    checkpoint_score_order=cfg.sweep.mode,
                ),
                callbacks=[Progress(cfg, total), *callbacks],
            ),
        )  # fmt: skip
    log.info(
        "sweep %s: %s search, %d trial(s), up to %d at once, %d steps each%s; results in %s",
        cfg.run.name, cfg.sweep.search, trial_count(cfg), concurrency, total,
        ", ASHA early stopping" if cfg.sweep.early_stopping else "", path,
    )  # fmt: skip
    grid = _fit(tuner)
    records = [_record(result, cfg, total) for result in grid]
    scored = [t for t in records if t.best is not None and t.checkpoint]
    best = (min if cfg.sweep.mode == "min" else max)(scored, key=lambda t: t.best) if scored else None
    if best is not None and cfg.sweep.rank_by != "metric":
        best = rank_by_answers(cfg, check, scored, storage)
    records.sort(key=lambda t: (t.best is None, (t.best or 0) * (1 if cfg.sweep.mode == "min" else -1)))
    with tempfile.TemporaryDirectory() as staging:
        report.write(records, Path(staging), cfg.sweep.metric, best and best.trial_id)
        upload_dir(Path(staging), f"{path}/{REPORT_DIR}")
    print(report.table(records, cfg.sweep.metric, best and best.trial_id), flush=True)
    if best is None:
        raise SweepError(f"no trial produced a checkpoint; see the errors above and the trial logs under {path}")
    location = register_best(cfg, best, check, storage, path)
    return SweepOutcome(records, best, location, cfg.run.name, f"{path}/{REPORT_DIR}", path, cfg.sweep.metric)


def rank_by_answers(cfg: Config, check: Any, scored: list[report.TrialRecord], storage: str) -> report.TrialRecord:
    """The trial whose answers to the holdout split score best under ``sweep.rank_by`` (by that metric's direction).

    The ``sweep.rank_top_k`` best trials by ``sweep.metric`` answer (greedy, ``serve.default_max_tokens``,
    through the evaluation job's Ray Data path) from their best checkpoints; each one's score is recorded.
    """
    import ray.train

    from jobs.evaluate import generate_answers, holdout_prompts
    from jobs.loop import ADAPTER_DIR
    from qlora_ray.metrics import Similarity, by_name, summarize

    candidates = sorted(scored, key=lambda t: t.best if cfg.sweep.mode == "min" else -t.best)[: cfg.sweep.rank_top_k]
    rows = holdout_prompts(cfg, check)
    references = [row["reference"] for row in rows]
    similarity = Similarity()
    filesystem, _ = filesystem_of(storage)
    for trial in candidates:
        checkpoint = ray.train.Checkpoint(trial.checkpoint, filesystem=filesystem)
        with checkpoint.as_directory() as directory:
            answers = generate_answers(trial_config(cfg, trial.params), str(Path(directory) / ADAPTER_DIR), rows,
                                       with_base=False)  # fmt: skip
        tuned = [answers[i][1] for i in range(len(rows))]
        scores = summarize(tuned, references, similarity.scores(tuned, references))
        trial.generation = scores[cfg.sweep.rank_by]
        log.info("trial %s (%s): holdout answers %s %.4f", trial.trial_id, trial.label, cfg.sweep.rank_by,
                 trial.generation)  # fmt: skip
    return by_name(cfg.sweep.rank_by).best(candidates, key=lambda t: t.generation)


def _fit(tuner: Any) -> Any:
    """``tuner.fit()``, then the SIGINT/SIGUSR1 handlers as they were: Tune installs its own and leaves them,
    after which Ctrl-C would no longer stop a caller that keeps running (the pipeline serving its endpoint)."""
    signals = [signal.SIGINT, signal.SIGUSR1]
    handlers = [signal.getsignal(s) for s in signals]
    try:
        return tuner.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            for number, handler in zip(signals, handlers, strict=True):
                signal.signal(number, handler)


DRIVER_CPUS = 0.01  # a multi-worker trial's driver function only waits on its trainer; Ray refuses 0


def _check_same_sweep(path: str, cfg: Config) -> None:
    """A resumed sweep must be the same sweep: its trials continue checkpoints trained with those settings."""
    text = read_text(f"{path}/{SWEEP_CONFIG}")
    if text is None:
        return
    saved = yaml.safe_load(text)
    changed = changed_keys(saved, cfg.model_dump())
    if changed:
        raise SweepError(
            f"{path} holds a sweep run with other settings ({', '.join(changed)} differ): rerun it with the "
            "same config to resume it, or give this one another run.name"
        )


def trial_resources(cfg: Config, cluster: dict[str, float]) -> tuple[dict[str, float], int]:
    """Resources of each worker of a trial, and how many trials run at once.

    With one worker the trial's actor is the worker and gets them all. With several, a trial's CPUs include
    its driver function's share, so that two 2-worker 1-CPU trials do fit on 4 CPUs.
    """
    workers = cfg.train.num_workers
    cpus = cfg.sweep.cpus_per_trial or workers * cfg.train.cpus_per_worker
    per_worker = {"CPU": cpus if workers == 1 else (cpus - DRIVER_CPUS) / workers}
    fits = cluster.get("CPU", 0) / cpus
    if cfg.train.use_gpu:
        gpus = cfg.sweep.gpus_per_trial or workers
        per_worker["GPU"] = gpus / workers
        fits = min(fits, cluster.get("GPU", 0) / gpus)
    fits = max(1, math.floor(fits + 1e-9))
    return per_worker, cfg.sweep.max_concurrent_trials or fits


def _record(result: Any, cfg: Config, total: int) -> report.TrialRecord:
    params = dict(result.config or {})  # the searched keys, as Tune set them
    trial = trial_config(cfg, params) if params else cfg
    metrics = result.metrics or {}
    frame = result.metrics_dataframe
    history, best, checkpoint, best_step = [], None, None, 0
    metric = cfg.sweep.metric
    if frame is not None and metric in frame:
        rows = frame.dropna(subset=[metric])
        history = [(int(s), float(v)) for s, v in zip(rows["step"], rows[metric], strict=True)]
    saved = _checkpoints(result, metric)
    if saved:
        pick = (min if cfg.sweep.mode == "min" else max)(saved)
        best, best_step, checkpoint = pick
    steps = history[-1][0] if history else 0
    if result.error is not None:
        status, error = "failed", failure_summary(result.error)
    else:
        status, error = ("finished" if steps >= total else "stopped early"), None
    trial_id = str(metrics.get("trial_id") or Path(result.path).name)
    return report.TrialRecord(
        trial_id=trial_id, r=trial.lora.r, alpha=trial.lora.alpha, lr=trial.train.lr, dropout=trial.lora.dropout,
        status=status, steps=steps, best=best, history=history, checkpoint=checkpoint, error=error,
        best_step=best_step, params=params,
    )  # fmt: skip


def _checkpoints(result: Any, metric: str) -> list[tuple[float, int, str]]:
    """(metric, step, path) of each checkpoint a trial saved: Tune keeps those of a one-worker trial; a
    multi-worker trial's are its Ray Train run's, whose paths it reported as ``checkpoint_path``."""
    frame = result.metrics_dataframe
    if frame is not None and "checkpoint_path" in frame and metric in frame:
        rows = frame.dropna(subset=[metric, "checkpoint_path"])
        return [(float(v), int(s), str(p)) for v, s, p in zip(rows[metric], rows["step"], rows["checkpoint_path"],
                                                               strict=True)]  # fmt: skip
    return [(float(m[metric]), int(m["step"]), c.path) for c, m in result.best_checkpoints or [] if metric in m]


def register_best(cfg: Config, best: report.TrialRecord, check: Any, storage: str, path: str) -> str:
    """Copy the best trial's best checkpoint into the registry with a manifest; returns its location."""
    import ray.train

    trial = trial_config(cfg, best.params)
    filesystem, _ = filesystem_of(storage)
    checkpoint = ray.train.Checkpoint(best.checkpoint, filesystem=filesystem)
    with checkpoint.as_directory() as directory:  # the metrics reported with this very checkpoint
        metrics = json.loads((Path(directory) / STATE_FILE).read_text())["metrics"]
    if best.generation is not None:
        metrics[cfg.sweep.rank_by] = best.generation
    source = {"kind": "sweep", "path": path, "trial": best.trial_id, "checkpoint": best.checkpoint}
    return register_checkpoint(trial, checkpoint, metrics, check, source, cfg.sweep.metric, cfg.sweep.mode)


class Progress(ray.tune.Callback):
    """One line per trial evaluation: the trial's loss, the sweep's counts, the best so far and an ETA.

    The ETA is an upper bound: it assumes every trial runs all its steps, which ASHA's early stops cut short.
    """

    def __init__(self, cfg: Config, total: int):
        self.cfg, self.total, self.best = cfg, total, None
        self.steps: dict[str, int] = {}  # the last step each trial reported
        self.start = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        cfg = self.cfg
        metric, value = cfg.sweep.metric, result.get(cfg.sweep.metric)
        if value is None:
            return
        better = self.best is None or (value < self.best[0] if cfg.sweep.mode == "min" else value > self.best[0])
        if better:
            self.best = (value, trial.trial_id)
        self.steps[trial.trial_id] = int(result.get("step", 0))
        counts = Counter(str(t.status).lower() for t in trials)
        log.info(
            "trial %s (%s) step %d/%d %s %.4f | running %d, pending %d, done %d, failed %d | best %.4f (%s) | %s",
            trial.trial_id, describe(trial.config, cfg), result.get("step", 0), self.total, metric, value,
            counts["running"], counts["pending"], counts["terminated"], counts["error"], *self.best,
            self._eta(len(trials)),
        )  # fmt: skip

    def _eta(self, trials: int) -> str:
        budget = max(trials, trial_count(self.cfg)) * self.total
        done = sum(self.steps.values())
        elapsed = time.monotonic() - self.start
        remaining = elapsed / max(done, 1) * max(budget - done, 0)
        return f"sweep eta at most {clock(remaining)}"

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        step = (trial.last_result or {}).get("step", 0)
        log.info("trial %s %s at step %d/%d", trial.trial_id, "finished" if step >= self.total else "stopped early",
                 step, self.total)  # fmt: skip

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.warning("trial %s failed (the sweep goes on); its error is in %s", trial.trial_id, trial.path)


def main(argv: list[str] | None = None, prog: str = "python -m tune.sweep") -> int:
    args = cli.parser(prog, cli.description(__doc__), example="sweep.num_samples=4").parse_args(argv)
    return cli.run(args, lambda: _report(run_sweep(cli.load(args, "sweep"))))


def _report(outcome: SweepOutcome) -> None:
    best = outcome.best
    print(f"\nbest trial {best.trial_id}: {best.label}, {outcome.metric} {best.best:.4f} at step {best.best_step}")
    print(f"registered as {outcome.registry_name!r}: {outcome.adapter}  (qlora-ray artifacts list)")
    print(f"report: {outcome.report_dir}/trials.csv, trials.json, sweep.png")
    print(f"TensorBoard: tensorboard --logdir {outcome.path}")


if __name__ == "__main__":
    sys.exit(main())
