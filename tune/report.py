"""What a person reads after a sweep: a table of trials, CSV/JSON of the same, and a PNG plot."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The searched keys that have columns of their own (r, alpha, lr, dropout): every trial has these settings, searched
# or not, so they are always shown; any other searched key gets a column named by its dotted key.
SHOWN = ("lora.r", "lora.alpha", "train.lr", "lora.dropout")


@dataclass
class TrialRecord:
    """One trial as the report shows it. ``history`` holds (step, metric) at every evaluation.

    ``r``, ``alpha``, ``lr`` and ``dropout`` are the trial's own settings; ``params`` its searched config keys as
    Tune set them, which ``tune.space.trial_config`` turns back into the trial's config.
    """

    trial_id: str
    r: int
    alpha: float
    lr: float
    dropout: float
    status: str  # "finished", "stopped early" or "failed"
    steps: int = 0
    best: float | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: str | None = None  # the best checkpoint's path in run storage
    error: str | None = None
    best_step: int = 0  # the step of that checkpoint
    generation: float | None = None  # its holdout answers' score under sweep.rank_by, when ranked so
    params: dict[str, Any] = field(default_factory=dict)  # the searched config keys, e.g. {"lora.r": 8, ...}

    @property
    def label(self) -> str:
        extra = "".join(f" {key}={format_value(value)}" for key, value in self.params.items() if key not in SHOWN)
        return f"r={self.r} lr={self.lr:.1e}{extra}"


def format_value(value: Any) -> str:
    """A searched value as a table cell or label shows it: floats short (``0.1``, ``3e-05``), the rest as is."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def extra_keys(records: list[TrialRecord]) -> list[str]:
    """The searched keys beyond rank, alpha, lr and dropout, in the order first seen: one column each."""
    return list(dict.fromkeys(key for t in records for key in t.params if key not in SHOWN))


def _row(t: TrialRecord, extra: list[str]) -> list[str]:
    best = "-" if t.best is None else f"{t.best:.4f}"
    if t.generation is not None:
        best += f" (answers {t.generation:.4f})"
    status = t.status + (f": {t.error}" if t.error else "")
    searched = [format_value(t.params[key]) if key in t.params else "-" for key in extra]
    return [t.trial_id, str(t.r), f"{t.alpha:g}", f"{t.lr:.2e}", f"{t.dropout:g}", *searched, str(t.steps), best,
            status]  # fmt: skip


def table(records: list[TrialRecord], metric: str, best_id: str | None) -> str:
    """A fixed-width table of trials, best first; the winner is marked with ``*``."""
    extra = extra_keys(records)
    header = ["trial", "rank", "alpha", "lr", "dropout", *extra, "steps", f"best {metric}", "status"]
    rows = []
    for t in records:
        row = _row(t, extra)
        rows.append([("* " if t.trial_id == best_id else "  ") + row[0], *row[1:]])
    header[0] = "  " + header[0]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
             for r in [header, *rows]]  # fmt: skip
    return "\n".join(lines)


def write(records: list[TrialRecord], directory: Path, metric: str, best_id: str | None) -> dict[str, Path]:
    """``trials.csv``, ``trials.json`` and ``sweep.png`` in ``directory``; returns their paths by kind."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"csv": directory / "trials.csv", "json": directory / "trials.json", "png": directory / "sweep.png"}
    extra = extra_keys(records)
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", "r", "alpha", "lr", "dropout", *extra, "steps", f"best_{metric}", "status",
                         "error", "generation_score"])  # fmt: skip
        for t in records:
            searched = [t.params.get(key, "") for key in extra]
            writer.writerow([t.trial_id, t.r, t.alpha, t.lr, t.dropout, *searched, t.steps, t.best, t.status,
                             t.error or "", "" if t.generation is None else t.generation])  # fmt: skip
    payload = {"metric": metric, "best_trial": best_id, "trials": [asdict(t) for t in records]}
    paths["json"].write_text(json.dumps(payload, indent=2))
    plot(records, paths["png"], metric, best_id)
    return paths


def plot(records: list[TrialRecord], path: Path, metric: str, best_id: str | None) -> None:
    """Left: the metric over steps per trial. Right: each trial's best value by rank and learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, grid) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t in records:
        if t.history:
            steps, values = zip(*t.history, strict=True)
            style = {"linewidth": 2.5, "color": "black"} if t.trial_id == best_id else {"linewidth": 1, "alpha": 0.8}
            curves.plot(steps, values, marker="o", markersize=3, label=t.label, **style)
    curves.set(xlabel="optimizer step", ylabel=metric, title=f"{metric} per trial (best in black)")
    if any(t.history for t in records):
        curves.legend(fontsize=7, ncols=2)
    scored = [t for t in records if t.best is not None and math.isfinite(t.best)]
    if scored:
        points = grid.scatter(
            [t.lr for t in scored], [t.r for t in scored], c=[t.best for t in scored], cmap="viridis_r", s=120
        )
        for t in scored:
            grid.annotate(f"{t.best:.3f}", (t.lr, t.r), textcoords="offset points", xytext=(0, 9), ha="center")
        fig.colorbar(points, ax=grid, label=f"best {metric}")
        grid.margins(0.2)
    grid.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="LoRA rank", title=f"best {metric}: rank x lr")
    ranks = sorted({t.r for t in records})
    grid.set_yticks(ranks, [str(r) for r in ranks])
    grid.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
