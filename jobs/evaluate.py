"""Evaluate an adapter against its base model on the holdout split.

    python -m jobs.evaluate --config configs/quickstart.yaml --adapter NAME_OR_DIR [key=value ...]

The holdout split is the training run's (same data, seed and fraction). Answers are generated through Ray
Data, in batches on an actor pool (``eval.workers`` actors, on GPU with ``train.use_gpu``), by the code Serve
runs: the one prompt formatter, ``qlora_ray.generate``'s loader, adapter set and decode loop, greedy, at most
``serve.default_max_tokens`` new tokens. Base and fine-tuned answers come from the same batch (the base rows
run with the adapter disabled). The report, ``eval.json``, goes beside the adapter (in the registry for a
registered one) and is printed as a table: overall and per tag, base and fine-tuned side by side, with
example rows.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.templates import build_prompt, question_of
from jobs.preflight import prepare_run
from qlora_ray import cli, console, metrics
from qlora_ray.config import Config, from_dict
from qlora_ray.registry import Registry
from qlora_ray.runtime import start_ray

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
ADAPTER = "evaluated"  # the adapter's name inside an evaluation worker
EXAMPLES = 5
BATCH = 8


@dataclass
class EvalOutcome:
    report: dict[str, Any]
    path: str


def run_evaluate(
    cfg: Config, adapter: str, workers: int = 1, prepared: tuple[Config, Any] | None = None
) -> EvalOutcome:
    """Generate base and fine-tuned answers for the holdout split, score them, write ``eval.json`` and the card.

    ``prepared``: what ``jobs.preflight.prepare_run`` returned for ``cfg``, when the caller ran it already.
    """
    cfg, check = prepared or prepare_run(cfg)
    assert check.data is not None
    directory, registry_name = _resolve(cfg, adapter)
    examples = check.data.holdout_examples
    rows = holdout_prompts(cfg, check)
    ray = start_ray()
    answers = generate_answers(cfg, directory, rows, workers)
    holdout_loss = ray.remote(_holdout_loss).options(**_resources(cfg))
    loss = ray.get(holdout_loss.remote(cfg.model_dump(), directory, check.data.holdout_rows))
    report = score(examples, answers, loss)
    report["adapter"] = registry_name or directory
    report["generation"] = {"temperature": 0, "max_tokens": cfg.serve.default_max_tokens}
    path = _write(cfg, directory, registry_name, report)
    return EvalOutcome(report, path)


def holdout_prompts(cfg: Config, check: Any) -> list[dict[str, Any]]:
    """The holdout split as generation rows: index, prompt (the training formatter's) and reference answer."""
    return [
        {"i": i, "prompt": build_prompt(ex, cfg.data.template, check.tokenizer), "reference": ex["completion"]}
        for i, ex in enumerate(check.data.holdout_examples)
    ]


def _resolve(cfg: Config, adapter: str) -> tuple[str, str | None]:
    """A local adapter directory, and its registry name when it came from the registry."""
    if Path(adapter).is_dir():
        return str(Path(adapter).resolve()), None
    registry = Registry(cfg.run.registry)
    cache = Path(tempfile.gettempdir()) / "qlora-ray-eval-adapters"
    return registry.local_dir(adapter, cache), adapter


def _resources(cfg: Config) -> dict[str, Any]:
    return {"num_gpus": 1} if cfg.train.use_gpu else {"num_cpus": cfg.train.cpus_per_worker}


def generate_answers(
    cfg: Config, directory: str, rows: list[dict[str, Any]], workers: int = 1, with_base: bool = True
) -> dict[int, tuple[str | None, str]]:
    """Greedy answers to ``rows`` (from :func:`holdout_prompts`) by row index: (base model's, adapter's).

    Without ``with_base`` only the adapter answers (the base's answer is None).
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items(rows).map_batches(
        Answerer,
        fn_constructor_kwargs={"config": cfg.model_dump(), "directory": directory, "with_base": with_base},
        batch_size=BATCH,
        concurrency=workers,
        **_resources(cfg),
    )
    answers: dict[int, tuple[str | None, str]] = {}
    progress = console.Progress("answering holdout rows", len(rows))
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i, base, tuned in zip(batch["i"], batch["base"], batch["tuned"], strict=True):
            answers[int(i)] = (str(base) if with_base else None, str(tuned))
        progress.advance(len(batch["i"]))
    return answers


class Answerer:
    """A Ray Data actor: the base model with the adapter, answering each prompt with and without it."""

    def __init__(self, config: dict[str, Any], directory: str, with_base: bool = True):
        import torch

        from qlora_ray.generate import AdapterSet, load_inference_model
        from qlora_ray.model import load_tokenizer

        console.setup_worker()
        cfg = from_dict(config, source="evaluation")
        self.device = "cuda" if cfg.train.use_gpu else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, round(cfg.train.cpus_per_worker)))
        self.tokenizer = load_tokenizer(cfg.model)
        self.adapters = AdapterSet(load_inference_model(cfg.model, self.device))
        self.adapters.load(ADAPTER, directory)
        self.max_tokens = cfg.serve.default_max_tokens
        self.with_base = with_base

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from qlora_ray.generate import BASE, Sampling, generate_text

        prompts = [str(p) for p in batch["prompt"]]
        n = len(prompts)
        greedy = Sampling(max_tokens=self.max_tokens, temperature=0)
        sides = [BASE, ADAPTER] if self.with_base else [ADAPTER]  # one batch: base rows run with the adapter off
        texts = generate_text(self.adapters.model, self.tokenizer, prompts * len(sides), greedy,
                              [side for side in sides for _ in prompts])  # fmt: skip
        return {"i": batch["i"], "base": texts[:n] if self.with_base else [""] * n, "tuned": texts[-n:]}


def _holdout_loss(config: dict[str, Any], directory: str, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Holdout loss of the base and of the adapter, token-weighted over the completions (as training reports)."""
    import contextlib

    import torch

    from jobs.loop import Dist, evaluate
    from qlora_ray.generate import AdapterSet, load_inference_model
    from qlora_ray.model import load_tokenizer

    console.setup_worker()
    cfg = from_dict(config, source="evaluation")
    device = "cuda" if cfg.train.use_gpu else "cpu"
    torch.set_num_threads(max(1, round(cfg.train.cpus_per_worker)))
    tokenizer = load_tokenizer(cfg.model)
    adapters = AdapterSet(load_inference_model(cfg.model, device))
    adapters.load(ADAPTER, directory)
    model, dist = adapters.model, Dist(0, 1, device)
    with torch.inference_mode():
        tuned = evaluate(model, rows, tokenizer, cfg, dist, contextlib.nullcontext())
        with model.disable_adapter():
            base = evaluate(model, rows, tokenizer, cfg, dist, contextlib.nullcontext())
    return {"base": base["val_loss"], "tuned": tuned["val_loss"]}


def score(examples: list[dict[str, Any]], answers: dict[int, Any], loss: dict[str, float]) -> dict[str, Any]:
    """Every metric of ``qlora_ray.metrics.METRICS`` overall and per tag, for base and fine-tuned, plus example rows."""
    similarity = metrics.Similarity()
    refs = [ex["completion"] for ex in examples]
    base = [answers[i][0] for i in range(len(examples))]
    tuned = [answers[i][1] for i in range(len(examples))]
    sim = {"base": similarity.scores(base, refs), "tuned": similarity.scores(tuned, refs)}
    tags = sorted({ex.get("tag") or "untagged" for ex in examples})
    groups = {"overall": list(range(len(examples)))} | {
        tag: [i for i, ex in enumerate(examples) if (ex.get("tag") or "untagged") == tag] for tag in tags
    }
    report: dict[str, Any] = {"similarity_threshold": metrics.SIMILARITY_THRESHOLD, "groups": {}}
    for group, idx in groups.items():
        report["groups"][group] = {
            side: metrics.summarize([texts[i] for i in idx], [refs[i] for i in idx], [sim[side][i] for i in idx])
            for side, texts in (("base", base), ("tuned", tuned))
        }
    for side in ("base", "tuned"):
        report["groups"]["overall"][side]["holdout_loss"] = loss[side]
        report["groups"]["overall"][side]["holdout_perplexity"] = math.exp(min(loss[side], 50.0))
    report["examples"] = [
        {"question": question_of(examples[i])[1], "reference": refs[i], "base": base[i], "tuned": tuned[i]}
        for i in range(min(EXAMPLES, len(examples)))
    ]
    return report


def _write(cfg: Config, directory: str, registry_name: str | None, report: dict[str, Any]) -> str:
    """``eval.json`` beside the adapter, and its numbers in the adapter's model card (``README.md``)."""
    from qlora_ray.card import with_evaluation

    text = json.dumps(report, indent=2) + "\n"
    card_path = Path(directory) / "README.md"  # for a registry adapter, the local copy it was loaded from
    card = with_evaluation(card_path.read_text() if card_path.exists() else "", report)
    if registry_name is None:
        card_path.write_text(card)
        path = Path(directory) / EVAL_FILE
        path.write_text(text)
        return str(path)
    registry = Registry(cfg.run.registry)
    registry.write_file(registry_name, "README.md", card)
    return registry.write_file(registry_name, EVAL_FILE, text)


def table(report: dict[str, Any]) -> str:
    """The report as a readable table: one line per group and metric, base vs fine-tuned."""
    lines = [f"{'group':<14} {'metric':<26} {'base':>9} {'tuned':>9}"]
    answers = [(m.name, m.fmt) for m in metrics.METRICS]
    losses = [("holdout_loss", ".4f"), ("holdout_perplexity", ".4f")]  # measured over the whole holdout split only
    for group, sides in report["groups"].items():
        for name, fmt in answers + (losses if group == "overall" else []):
            lines.append(f"{group:<14} {name:<26} {sides['base'][name]:>9{fmt}} {sides['tuned'][name]:>9{fmt}}")
        lines.append(f"{group:<14} {'rows':<26} {sides['base']['count']:>9d}")
    return "\n".join(lines)


def overview(report: dict[str, Any], path: str) -> str:
    """The overall numbers in a few lines (the pipeline's console); per tag they are in ``path`` and the card."""
    overall = report["groups"]["overall"]
    base, tuned = overall["base"], overall["tuned"]
    lines = [f"evaluation on {base['count']} holdout rows, base -> adapter (per tag: {path} and the model card)"]
    rows = [(m.label, m.fmt, m.name) for m in metrics.METRICS] + [("holdout loss", ".4f", "holdout_loss")]
    lines += [f"  {label:<31} {base[name]:{fmt}} -> {tuned[name]:{fmt}}" for label, fmt, name in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m jobs.evaluate") -> int:
    parser = cli.parser(prog, cli.description(__doc__), example="serve.default_max_tokens=64")
    parser.add_argument("--adapter", required=True, help="registry name or adapter directory")
    parser.add_argument("--workers", type=int, default=1, help="generation actors (Ray Data actor pool)")
    args = parser.parse_args(argv)
    return cli.run(args, lambda: _report(run_evaluate(cli.load(args, "evaluate"), args.adapter, args.workers)))


def _report(outcome: EvalOutcome) -> None:
    print(table(outcome.report))
    print(f"\nreport: {outcome.path}")


if __name__ == "__main__":
    sys.exit(main())
