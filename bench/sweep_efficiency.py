"""Sweep efficiency: our ASHA sweep with concurrent trials against a sequential full grid, in one run.

    .venv/bin/python bench/sweep_efficiency.py

The same 8 configurations (LoRA rank 8, 16, 32, 64 x learning rate 1e-4, 5e-4; alpha = 2 x rank) on the
quickstart model and data (starter model in NF4, sample FAQ set, 2 epochs):

- ``asha``: ``tune.sweep.run_sweep`` with ``search: grid``, ASHA early stopping and two one-CPU trials at a
  time: the wall-clock time from start (Ray start-up included) to the registered adapter, and each trial's
  start-up (Tune starting it to its first optimizer step).
- ``grid``: each configuration trained to the end with ``jobs.loop.train`` in this process, one after the
  other, on both cores, reloading the model for each (the way a cartesian ``--sweep`` runs); no Ray.

Reported: wall-clock time and compute (optimizer steps summed over trials) of both, the ratio a/b, each
one's best configuration and best holdout loss, and how far apart the two best losses are.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.variants import run_variant  # noqa: E402

RANKS, LRS = [8, 16, 32, 64], [1e-4, 5e-4]


def _config(storage: str, extra: list[str]):
    from qlora_ray.config import load_config

    return load_config(
        REPO / "configs/quickstart.yaml",
        [
            "sweep.search=grid", f"sweep.ranks={RANKS}", f"sweep.lr_grid={LRS}", "sweep.num_samples=1",
            "train.eval_every=4", "train.logging_steps=100", f"run.storage_path={storage}",
            f"run.registry={storage}/registry", "run.name=bench-sweep", *extra,
        ],
    )  # fmt: skip


def startup_clock():
    """A Tune callback timing each trial from Tune starting it to its loop's first step.

    That is the time to its first result less the loop's own clock at that result (``train_seconds``, which
    the loop starts just before its first step): actor start or reuse, a Train run if any, model load.
    """
    import ray.tune

    class StartupClock(ray.tune.Callback):
        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.startup: list[tuple[str, float]] = []  # (trial id, seconds), in the order trials began

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.started[trial.trial_id] = time.monotonic()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            began = self.started.pop(trial.trial_id, None)
            if began is not None and "train_seconds" in result:
                self.startup.append((trial.trial_id, time.monotonic() - began - result["train_seconds"]))

    return StartupClock()


def run_asha(extra: list[str]) -> dict:
    from tune.sweep import run_sweep

    clock = startup_clock()
    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        outcome = run_sweep(_config(storage, ["sweep.grace_period=4", "sweep.reduction_factor=3",
                                              "sweep.cpus_per_trial=1", *extra]), callbacks=[clock])  # fmt: skip
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "startup": [round(s, 1) for _, s in clock.startup],
        "trial_steps": sum(t.steps for t in outcome.records),
        "best": {"r": outcome.best.r, "lr": outcome.best.lr, "val_loss": outcome.best.best},
        "trials": [
            {"r": t.r, "lr": t.lr, "steps": t.steps, "best": t.best, "status": t.status} for t in outcome.records
        ],
    }


def run_grid(extra: list[str]) -> dict:
    from data.dataset import prepare
    from data.tokenize import TokenizeSettings
    from jobs.loop import seed_everything, train
    from qlora_ray.model import attach_lora, load_model, load_tokenizer
    from tune.space import trial_config

    with tempfile.TemporaryDirectory() as storage:
        base = _config(storage, extra)
        start = time.perf_counter()
        tokenizer = load_tokenizer(base.model)
        data = prepare(base.data, tokenizer, TokenizeSettings.from_config(base))
        trials = []
        for r in RANKS:
            for lr in LRS:
                cfg = trial_config(base, {"lora.r": r, "train.lr": lr})
                seed_everything(cfg.train.seed)
                model = attach_lora(load_model(cfg.model), cfg)
                losses: list[float] = []
                report = lambda metrics, _dir, losses=losses: losses.append(metrics["val_loss"])  # noqa: E731
                final = train(cfg, model, tokenizer, data.train_rows, data.holdout_rows, report)
                trials.append({"r": r, "lr": lr, "steps": int(final["step"]), "best": min(losses)})
                print(f"grid r={r} lr={lr:g}: best val_loss {min(losses):.4f}", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - start
    best = min(trials, key=lambda t: t["best"])
    return {
        "seconds": seconds,
        "trial_steps": sum(t["steps"] for t in trials),
        "best": {"r": best["r"], "lr": best["lr"], "val_loss": best["best"]},
        "trials": trials,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides for both, e.g. train.epochs=1")
    parser.add_argument("--variant", choices=["asha", "grid"], help="run one side only, in this process")
    args = parser.parse_args(argv)
    if args.variant:
        result = (run_asha if args.variant == "asha" else run_grid)(args.overrides)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results = {}
    for variant in ("asha", "grid"):
        result = run_variant(__file__, ["--variant", variant, *args.overrides])
        if result is None:
            return 1
        results[variant] = result
        print(f"{variant}: {results[variant]}", flush=True)
    a, b = results["asha"], results["grid"]
    print("\n| | wall-clock | trial-steps | best configuration | best holdout loss |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in (("(a) ASHA sweep, 2 trials at a time", a), ("(b) sequential full grid", b)):
        best = r["best"]
        print(f"| {name} | {r['seconds'] / 60:.1f} min | {r['trial_steps']} | r={best['r']} lr={best['lr']:g} | "
              f"{best['val_loss']:.4f} |")  # fmt: skip
    startup = a["startup"]
    later = sorted(startup[2:])  # the first two trials (one per slot) load the base; the others find it loaded
    print(f"\nper-trial start-up (Tune starting a trial to its first step), in trial order: {startup} s")
    if later:
        print(f"first two trials {startup[:2]} s; later trials median {later[len(later) // 2]:.1f} s, "
              f"max {later[-1]:.1f} s")  # fmt: skip
    gap = (a["best"]["val_loss"] - b["best"]["val_loss"]) / b["best"]["val_loss"]
    same = (a["best"]["r"], a["best"]["lr"]) == (b["best"]["r"], b["best"]["lr"])
    print(f"\na/b wall-clock = {a['seconds'] / b['seconds']:.2f}; a/b trial-steps = "
          f"{a['trial_steps'] / b['trial_steps']:.2f}")  # fmt: skip
    print(f"same best configuration: {'yes' if same else 'no'}; best loss of (a) vs (b): {gap:+.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
