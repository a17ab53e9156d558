"""Quality: the quickstart recipe on both seed datasets, base model against the fine-tuned adapter, per tag.

    .venv/bin/python bench/quality.py [--seed-data ../shared/seed-data] [--only galaxy|hea]

For each seed dataset this runs the two jobs a user runs, as subprocesses: ``python -m jobs.train`` with
``configs/quickstart.yaml`` (the offline starter model in NF4, r=16, alpha=32, lr 5e-4 cosine, batch 8,
max_seq_len 256) pointed at the seed data, then ``python -m jobs.evaluate`` on the exported adapter, and
prints the holdout metrics of ``eval.json`` for base and fine-tuned, overall and per tag, as Markdown.

- ``galaxy``: the tagged FAQ set (``<GALAXY>``, ``<ALIBABA>``, ``<GENERAL>``), one epoch, answers of at
  most 64 tokens.
- ``hea``: the context question-answering set with the seed recipe's prompt and answer-keeping truncation,
  ``--hea-steps`` optimizer steps (a fraction of an epoch: a full epoch takes hours on 2 CPU cores), a 2%
  holdout, answers of at most 32 tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
METRICS = ["exact_match", "token_f1", "rouge_l", "bleu", "similarity", "similarity_match_accuracy"]


def datasets(seed: Path, hea_steps: int) -> dict[str, dict]:
    """The quickstart config's changes per dataset: the seed's data settings and this machine's time budget."""
    return {
        "galaxy": {"data": {"path": str(seed / "galaxy_alibaba_qa.json"), "format": "auto"},
                   "train": {"epochs": 1}, "serve": {"default_max_tokens": 64}},
        "hea": {"data": {"path": str(seed / "hea_qa_squad.json"), "format": "context_qa",
                         "template": "{context}\nQuestion: {question}\nAnswer:", "overlength": "truncate",
                         "holdout_fraction": 0.02},
                "train": {"max_steps": hea_steps, "eval_every": 0}, "serve": {"default_max_tokens": 32}},
    }  # fmt: skip


def run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as out:
        proc = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(command[:3])} failed; see {log}")
    return time.perf_counter() - start


def measure(name: str, changes: dict, work: Path) -> dict:
    cfg = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    for section, values in changes.items():
        cfg[section].update(values)
    cfg["run"].update(name=f"quality-{name}", storage_path=str(work / "runs"), registry=str(work / "registry"))
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = work / f"{name}.log"
    train_s = run([sys.executable, "-m", "jobs.train", "--config", str(path)], log)
    adapter = work / "runs" / f"quality-{name}" / "adapter"
    eval_s = run([sys.executable, "-m", "jobs.evaluate", "--config", str(path), "--adapter", str(adapter)], log)
    report = json.loads((adapter / "eval.json").read_text())
    return {"dataset": name, "train_s": train_s, "eval_s": eval_s,
            "steps": json.loads((adapter / "metrics.json").read_text()).get("step"), "report": report}  # fmt: skip


def markdown(result: dict) -> str:
    groups = result["report"]["groups"]
    lines = [
        f"### {result['dataset']} ({result['steps']} optimizer steps; train {result['train_s'] / 60:.1f} min, "
        f"evaluate {result['eval_s'] / 60:.1f} min)",
        "",
        "| group | rows | " + " | ".join(METRICS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |",
    ]
    for group, sides in groups.items():
        cells = []
        for metric in METRICS:
            base, tuned = sides["base"][metric], sides["tuned"][metric]
            mark = "" if tuned > base else (" =" if tuned == base else " (worse)")
            cells.append(f"{base:.3f} -> {tuned:.3f}{mark}")
        lines.append(f"| {group} | {sides['base']['count']} | " + " | ".join(cells) + " |")
    overall = groups["overall"]
    lines += ["", f"holdout loss {overall['base']['holdout_loss']:.3f} -> {overall['tuned']['holdout_loss']:.3f}, "
              f"perplexity {overall['base']['holdout_perplexity']:.1f} -> {overall['tuned']['holdout_perplexity']:.1f}"]
    wins = sum(sides["tuned"][m] > sides["base"][m] for sides in groups.values() for m in METRICS)
    lines.append(f"fine-tuned better on {wins} of {len(METRICS) * len(groups)} metric x group cells")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed-data", type=Path, default=REPO.parent / "shared" / "seed-data")
    parser.add_argument("--only", choices=["galaxy", "hea"])
    parser.add_argument("--hea-steps", type=int, default=40)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    results = []
    work = Path(tempfile.mkdtemp(prefix="qlora-ray-quality-"))
    print(f"configs, logs, runs and adapters: {work}", flush=True)
    for name, changes in datasets(args.seed_data.resolve(), args.hea_steps).items():
        if args.only in (None, name):
            results.append(measure(name, changes, work))
            print(markdown(results[-1]) + "\n", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
