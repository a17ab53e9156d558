"""Quality: the quickstart recipe on both seed datasets, base model against the fine-tuned adapter, per tag.

    .venv/bin/python bench/quality.py [--seed-data ../shared/seed-data] [--only galaxy|hea]

For each seed dataset this runs the two jobs a user runs, as subprocesses: ``python -m jobs.train`` with
``configs/quickstart.yaml`` (the offline starter model in NF4, r=16, alpha=32, lr 5e-4 cosine, batch 8,
max_seq_len 256) pointed at the seed data, then ``python -m jobs.evaluate`` on the exported adapter, and
prints the holdout metrics of ``eval.json`` for base and fine-tuned, overall and per tag, as Markdown.

- ``galaxy``: the tagged FAQ set (``<GALAXY>``, ``<ALIBABA>``, ``<GENERAL>``), one epoch, answers of at
  most 64 tokens.
  Then the grounded mode (``serve.grounding``): the Serve app on a local Ray holds the adapter twice, once
  grounded in its training split and once not, and every holdout question goes to both over HTTP (greedy, the
  same 64 tokens), plus ``OFF_TOPIC`` questions to the grounded one. Reported: answer accuracy with and without
  grounding, the share of questions each path answered, and, offline with the replica's own decision code and
  the served model answers, the same figures for other thresholds.
- ``hea``: the context question-answering set with the seed recipe's prompt and answer-keeping truncation,
  ``--hea-steps`` optimizer steps (a fraction of an epoch: a full epoch takes hours on 2 CPU cores), a 2%
  holdout, answers of at most 32 tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from serve_load import free_port  # noqa: E402  (bench/ is this script's directory)

from qlora_ray import metrics  # noqa: E402

# The metrics of the grounded tables, which show a few to stay readable.
F1, MATCH = metrics.by_name("token_f1"), metrics.by_name("similarity_match_accuracy")
PLAIN, GROUNDED = "faq", "faq-grounded"
# Questions a visitor of a Galaxy / Alibaba Cloud FAQ bot might type that its Q&A set does not cover.
OFF_TOPIC = [
    "How do I bake sourdough bread?", "What is the capital of Australia?", "Who won the 2018 football World Cup?",
    "Can you recommend a good science fiction film?", "How tall is Mount Everest?", "Will it rain tomorrow?",
    "Write a short poem about cats.", "How do I fix a flat bicycle tyre?", "What is quantum entanglement?",
    "How many calories are in a banana?", "What is the best way to learn the guitar?", "Translate 'good morning' "
    "into Japanese.", "How do I change a car's oil?", "What are the symptoms of the flu?", "Who painted the Mona Lisa?",
    "How do I train my dog to sit?", "What is the boiling point of water at high altitude?",
    "Which planet has the most moons?", "How do I make a paper aeroplane?", "What is the plot of Hamlet?",
]  # fmt: skip
THRESHOLDS = [(exact, domain) for exact in (0.8, 0.85, 0.9, 0.95) for domain in (0.5, 0.6)]


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
    adapter = work / "runs" / f"quality-{name}" / "adapter"
    timings = work / f"{name}.timings.json"
    if not timings.exists():  # a --work directory from an earlier run keeps its adapter and evaluation
        train_s = run([sys.executable, "-m", "jobs.train", "--config", str(path)], log)
        eval_s = run([sys.executable, "-m", "jobs.evaluate", "--config", str(path), "--adapter", str(adapter)], log)
        timings.write_text(json.dumps({"train_s": train_s, "eval_s": eval_s}))
    report = json.loads((adapter / "eval.json").read_text())
    return {"dataset": name, **json.loads(timings.read_text()), "config": str(path), "adapter": str(adapter),
            "steps": json.loads((adapter / "metrics.json").read_text()).get("step"), "report": report}  # fmt: skip


def _header(first: str) -> list[str]:
    """The two header lines of a Markdown table: ``first``, rows, then one column per metric of the table."""
    labels = [m.label for m in metrics.METRICS]
    return [f"| {first} | rows | " + " | ".join(labels) + " |", ("| --- | --- | " + "--- | " * len(labels)).rstrip()]


def markdown(result: dict) -> str:
    groups = result["report"]["groups"]
    lines = [
        f"### {result['dataset']} ({result['steps']} optimizer steps; train {result['train_s'] / 60:.1f} min, "
        f"evaluate {result['eval_s'] / 60:.1f} min)",
        "",
        *_header("group"),
    ]
    for group, sides in groups.items():
        cells = []
        for m in metrics.METRICS:
            base, tuned = sides["base"][m.name], sides["tuned"][m.name]
            mark = "" if m.better(tuned, base) else (" =" if tuned == base else " (worse)")
            cells.append(_pair(m, sides["base"], sides["tuned"]) + mark)
        lines.append(f"| {group} | {sides['base']['count']} | " + " | ".join(cells) + " |")
    overall = groups["overall"]
    lines += ["", f"holdout loss {overall['base']['holdout_loss']:.3f} -> {overall['tuned']['holdout_loss']:.3f}, "
              f"perplexity {overall['base']['holdout_perplexity']:.1f} -> {overall['tuned']['holdout_perplexity']:.1f}"]
    # A win is a better score by the metric's own direction (a lower-is-better metric wins by falling).
    wins = sum(m.better(s["tuned"][m.name], s["base"][m.name]) for s in groups.values() for m in metrics.METRICS)
    lines.append(f"fine-tuned better on {wins} of {len(metrics.METRICS) * len(groups)} metric x group cells")
    return "\n".join(lines)


def grounded(result: dict, work: Path) -> dict:
    """The FAQ holdout through the Serve app, to the adapter alone and to the same adapter grounded."""
    import ray
    from ray import serve

    from data.dataset import split_examples
    from data.templates import messages_for
    from qlora_ray.config import load_config
    from qlora_ray.registry import Registry, dataset_entry
    from serve.__main__ import run_serve, wait_healthy

    registry = work / "grounding-registry"
    shutil.rmtree(registry, ignore_errors=True)
    cfg = load_config(result["config"], [f"run.registry={registry}", f"serve.port={free_port()}",
                                         "serve.grounding.enabled=true", f"serve.grounding.adapters=[{GROUNDED}]"])
    manifest = {"base_model": cfg.model.name_or_path, "dataset": dataset_entry(cfg.data.path, cfg.data.format)}
    for name in (PLAIN, GROUNDED):
        Registry(str(registry)).register(name, result["adapter"], manifest)
    loaded, _, holdout = split_examples(cfg.data)
    examples = [loaded.examples[i] for i in holdout]
    url, _ = run_serve(cfg)
    started = time.perf_counter()
    try:
        if not wait_healthy(url):
            sys.exit(f"the Serve app at {url} did not become healthy; see /tmp/ray/session_latest/logs/serve/")
        jobs = [(name, messages_for(ex)) for name in (PLAIN, GROUNDED) for ex in examples]
        jobs += [(GROUNDED, [{"role": "user", "content": q}]) for q in OFF_TOPIC]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda job: _ask(url, *job), jobs))
    finally:
        serve.shutdown()
        ray.shutdown()
    n = len(examples)
    return {"rows": n, "served_s": time.perf_counter() - started, "grounding": cfg.serve.grounding.model_dump(),
            "references": [ex["completion"] for ex in examples], "plain": answers[:n], "grounded": answers[n:2 * n],
            "off_topic": answers[2 * n:], "offline": _offline(registry, examples, answers[:n])}  # fmt: skip


def _ask(url: str, model: str, messages: list[dict]) -> tuple[str, str]:
    """One greedy chat request: (answer, x-answer-source)."""
    body = {"model": model, "messages": messages, "temperature": 0}
    reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=900)
    if reply.status_code != 200:
        sys.exit(f"{model} answered {reply.status_code}: {reply.text}")
    return reply.json()["choices"][0]["message"]["content"], reply.headers["x-answer-source"]


def _offline(registry: Path, examples: list[dict], plain: list[tuple[str, str]]) -> list[dict]:
    """Grounded answers at other thresholds: the replica's decision code, the served model answers."""
    from qlora_ray.config import GroundingConfig
    from qlora_ray.metrics import Similarity
    from qlora_ray.registry import Registry
    from serve.grounding import QASet, training_examples

    entry = Registry(str(registry)).get(GROUNDED)
    qa = QASet(training_examples(entry.uri, entry.manifest), Similarity())
    off_topic = [{"format": "prompt_completion", "prompt": q} for q in OFF_TOPIC]
    rows = []
    for exact, domain in THRESHOLDS:
        settings = GroundingConfig(enabled=True, exact_threshold=exact, domain_threshold=domain)
        verdicts = [qa.decide(ex, settings) for ex in examples]
        answers = [v.answer if v.answer is not None else text for v, (text, _) in zip(verdicts, plain, strict=True)]
        declined = sum(qa.decide(q, settings).source == "declined" for q in off_topic)
        rows.append({"exact": exact, "domain": domain, "sources": [v.source for v in verdicts], "answers": answers,
                     "off_topic_declined": declined})  # fmt: skip
    return rows


def grounded_markdown(g: dict) -> str:
    similarity, refs, n = metrics.Similarity(), g["references"], g["rows"]

    def scores(texts: list[str], idx: list[int]) -> dict:
        picked = [texts[i] for i in idx]
        return metrics.summarize(picked, [refs[i] for i in idx], similarity.scores(picked, [refs[i] for i in idx]))

    plain, grounded_ = [a for a, _ in g["plain"]], [a for a, _ in g["grounded"]]
    sources = [s for _, s in g["grounded"]]
    setting = g["grounding"]
    lines = [
        f"### galaxy, grounded ({n} holdout questions through the Serve app, {g['served_s'] / 60:.1f} min; "
        f"exact_threshold {setting['exact_threshold']}, domain_threshold {setting['domain_threshold']})",
        "",
        *_header("answers"),
    ]
    every = list(range(n))
    for label, texts in (("adapter alone", plain), ("adapter + grounding", grounded_)):
        cells = scores(texts, every)
        shown = [f"{cells[m.name]:{m.short_fmt}}" for m in metrics.METRICS]
        lines.append(f"| {label} | {n} | " + " | ".join(shown) + " |")
    lines += ["", f"| path (grounded) | share | {F1.label} alone -> grounded | {MATCH.label} alone -> grounded |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    for path in ("stored", "model", "declined"):
        idx = [i for i in every if sources[i] == path]
        if not idx:
            lines.append(f"| {path} | 0 of {n} | - | - |")
            continue
        a, b = scores(plain, idx), scores(grounded_, idx)
        lines.append(f"| {path} | {len(idx)} of {n} ({len(idx) / n:.0%}) | {_pair(F1, a, b)} | {_pair(MATCH, a, b)} |")
    declined = sum(s == "declined" for _, s in g["off_topic"])
    lines += ["", f"off-topic questions declined: {declined} of {len(g['off_topic'])}", "",
              "Other thresholds (offline: the replica's decision code on the same questions, model answers as served):",
              "", f"| exact | domain | stored | model | declined | {F1.label} | {MATCH.label} | off-topic declined |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in g["offline"]:
        cells = scores(row["answers"], every)
        count = {p: row["sources"].count(p) for p in ("stored", "model", "declined")}
        lines.append(f"| {row['exact']} | {row['domain']} | {count['stored']} | {count['model']} | {count['declined']} "
                     f"| {cells[F1.name]:{F1.short_fmt}} | {cells[MATCH.name]:{MATCH.short_fmt}} "
                     f"| {row['off_topic_declined']} of {len(OFF_TOPIC)} |")  # fmt: skip
    return "\n".join(lines)


def _pair(metric: metrics.Metric, before: dict, after: dict) -> str:
    """``metric``'s score in two summaries, as "before -> after"."""
    return f"{before[metric.name]:{metric.short_fmt}} -> {after[metric.name]:{metric.short_fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed-data", type=Path, default=REPO.parent / "shared" / "seed-data")
    parser.add_argument("--only", choices=["galaxy", "hea"])
    parser.add_argument("--hea-steps", type=int, default=40)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--work", type=Path, help="work directory; one from an earlier run reuses its adapters")
    args = parser.parse_args()
    results = []
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="qlora-ray-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"configs, logs, runs and adapters: {work}", flush=True)
    for name, changes in datasets(args.seed_data.resolve(), args.hea_steps).items():
        if args.only in (None, name):
            results.append(measure(name, changes, work))
            print(markdown(results[-1]) + "\n", flush=True)
            if name == "galaxy":
                results[-1]["grounded"] = grounded(results[-1], work)
                print(grounded_markdown(results[-1]["grounded"]) + "\n", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
