"""Training throughput: our loop on Ray Train against the seed recipe and a fair HF Trainer baseline.

    .venv/bin/python bench/train_throughput.py --data ../shared/seed-data/galaxy_alibaba_qa.json

Every variant trains the same model with the same LoRA adapter (built by ``qlora_ray.model``), the same
optimizer (paged AdamW 8-bit, lr 2e-4, grad norm 0.3) and 16 rows per optimizer step, each in its own
process, for a few optimizer steps. Gradient checkpointing is off (as in the quickstart config) except for
the seed recipe, which kept it on:

- ``ours``: ``jobs.train.run_train`` (Ray Train, one worker): completion-only labels, per-batch padding,
  length-grouped batches, 16 rows per micro-batch (padding no longer eats the memory for that), logits
  only at labelled positions, skip-sampled LoRA dropout on CPU (``jobs.dropout``).
- ``ours-loop-no-ray``: the same loop (``jobs.loop.train``) in a plain process: the cost of Ray on top.
- ``seed``: the seed recipe as written: HF ``Trainer`` with ``DataCollatorForLanguageModeling``, prompt and
  completion as one text, every row padded to 512 tokens, pad token = EOS.
- ``dynamic``: HF ``Trainer`` on our tokenised rows (completion-only labels) with per-batch (dynamic)
  padding, 4 x 4 as the recipe, and ``dynamic-16x1`` the same with 16 rows per micro-batch. Stock peft
  LoRA (``nn.Dropout``) and the model's full-logits loss.

Measured: useful (non-pad) tokens per second over the timed optimizer steps, the epoch time that implies,
and peak memory. Model loading and Ray start-up are not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.variants import run_variant  # noqa: E402

BATCH, ACCUM, LR, MAX_NORM, SEED_PAD = 4, 4, 2e-4, 0.3, 512


def _overrides(data: str, batch: int = BATCH, accum: int = ACCUM) -> list[str]:
    """The seed FAQ recipe's training settings on the quickstart config (starter model, no checkpointing)."""
    return [
        f"data.path={data}", "data.format=prompt_completion", f"train.batch_size={batch}", f"train.grad_accum={accum}",
        "train.optimizer=paged_adamw_8bit", "train.lr=2e-4", "train.max_grad_norm=0.3", "train.max_seq_len=512",
        "train.warmup_ratio=0", "train.cpus_per_worker=2",
    ]  # fmt: skip


def run_ours(data: str, steps: int, batch: int, accum: int) -> dict:
    from jobs.train import run_train
    from qlora_ray.config import load_config

    with tempfile.TemporaryDirectory() as storage:
        cfg = load_config(
            REPO / "configs/quickstart.yaml",
            [
                *_overrides(data, batch, accum),
                f"train.max_steps={steps}",
                f"train.eval_every={steps}",
                f"run.storage_path={storage}",
                "run.name=bench-ours",
            ],
        )
        metrics = run_train(cfg).metrics
    return {
        "tokens_per_second": metrics["tokens_per_second"],
        "useful_token_fraction": metrics["useful_token_fraction"],
        "peak_memory_gb": metrics["peak_memory_gb"],
    }


def run_loop(data: str, steps: int, batch: int, accum: int) -> dict:
    """Our training loop in this process, without Ray: what the Ray Train path costs on top."""
    from data.dataset import prepare
    from data.tokenize import TokenizeSettings
    from jobs.loop import seed_everything, train
    from qlora_ray.config import load_config
    from qlora_ray.model import attach_lora, load_model, load_tokenizer

    cfg = load_config(
        REPO / "configs/quickstart.yaml",
        [*_overrides(data, batch, accum), f"train.max_steps={steps}", f"train.eval_every={steps}"],
    )
    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare(cfg.data, tokenizer, TokenizeSettings.from_config(cfg))
    seed_everything(cfg.train.seed)
    model = attach_lora(load_model(cfg.model), cfg)
    metrics = train(cfg, model, tokenizer, prepared.train_rows, prepared.holdout_rows, lambda metrics, directory: None)
    return {key: metrics[key] for key in ("tokens_per_second", "useful_token_fraction", "peak_memory_gb")}


def run_trainer(data: str, steps: int, seed_recipe: bool, batch: int, accum: int) -> dict:
    import torch
    from transformers import (
        DataCollatorForLanguageModeling,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from data.dataset import prepare
    from data.tokenize import TokenizeSettings
    from qlora_ray.config import load_config
    from qlora_ray.model import attach_lora, load_model, load_tokenizer

    # The seed recipe kept prepare_model_for_kbit_training's default: gradient checkpointing on.
    checkpointing = [f"model.gradient_checkpointing={seed_recipe}"]
    cfg = load_config(REPO / "configs/quickstart.yaml", [*_overrides(data, batch, accum), *checkpointing])
    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare(cfg.data, tokenizer, TokenizeSettings.from_config(cfg))
    if seed_recipe:
        texts = [e["prompt"] + e["completion"] for e in prepared.train_examples]
        encoded = tokenizer(texts, padding="max_length", max_length=SEED_PAD, truncation=True)
        rows = [
            {"input_ids": i, "attention_mask": m}
            for i, m in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
        ]
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:
        rows = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in prepared.train_rows]
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    useful = {"tokens": 0, "positions": 0}

    def counting_collator(features):
        batch = collator(features)
        useful["tokens"] += int(batch["attention_mask"].sum())
        useful["positions"] += batch["attention_mask"].numel()
        return batch

    class Clock(TrainerCallback):
        """Times the whole training loop (every step), as our loop's tokens/s does."""

        start = end = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    torch.manual_seed(0)
    model = attach_lora(load_model(cfg.model), cfg)
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=steps,
            learning_rate=LR, max_grad_norm=MAX_NORM, optim="paged_adamw_8bit", lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=rows, data_collator=counting_collator, callbacks=[clock]
        )
        trainer.train()
    seconds = clock.end - clock.start
    return {
        "tokens_per_second": useful["tokens"] / seconds,
        "useful_token_fraction": useful["tokens"] / max(1, useful["positions"]),
        "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def epoch_tokens(data: str) -> int:
    from data.dataset import prepare
    from data.tokenize import TokenizeSettings
    from qlora_ray.config import load_config
    from qlora_ray.model import load_tokenizer

    cfg = load_config(REPO / "configs/quickstart.yaml", _overrides(data))
    prepared = prepare(cfg.data, load_tokenizer(cfg.model), TokenizeSettings.from_config(cfg))
    return sum(len(r["input_ids"]) for r in prepared.train_rows)


# name: (runner, rows per micro-batch, micro-batches per optimizer step); every variant takes 16 rows per step.
VARIANTS = {
    "ours": ("ours", 16, 1),
    "ours-loop-no-ray": ("loop", 16, 1),
    "seed": ("seed", BATCH, ACCUM),
    "dynamic": ("dynamic", BATCH, ACCUM),
    "dynamic-16x1": ("dynamic", 16, 1),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/seed-data/galaxy_alibaba_qa.json"))
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per variant (16 rows each)")
    parser.add_argument("--seed-steps", type=int, default=1, help="optimizer steps for the pad-to-512 recipe")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # one variant, in its own process, so peak memory is its own
        runner, batch, accum = VARIANTS[args.variant]
        steps = args.seed_steps if runner == "seed" else args.steps
        if runner == "ours":
            result = run_ours(args.data, steps, batch, accum)
        elif runner == "loop":
            result = run_loop(args.data, steps, batch, accum)
        else:
            result = run_trainer(args.data, steps, runner == "seed", batch, accum)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results = {}
    for variant in VARIANTS:
        result = run_variant(__file__, ["--variant", variant, "--data", args.data, "--steps", str(args.steps),
                                        "--seed-steps", str(args.seed_steps)])  # fmt: skip
        if result is None:
            return 1
        results[variant] = result
        print(f"{variant}: {results[variant]}", flush=True)
    tokens = epoch_tokens(args.data)
    print(
        f"\n| variant | rows x accumulation | useful tokens/s | useful-token share | epoch ({tokens} tokens) "
        "| peak memory |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for variant, r in results.items():
        _, batch, accum = VARIANTS[variant]
        minutes = tokens / r["tokens_per_second"] / 60
        print(f"| {variant} | {batch} x {accum} | {r['tokens_per_second']:.1f} | {r['useful_token_fraction']:.1%} | "
              f"{minutes:.1f} min | {r['peak_memory_gb']:.2f} GiB |")  # fmt: skip
    ours = results["ours"]["tokens_per_second"]
    print(f"\na/b (ours / seed recipe) = {ours / results['seed']['tokens_per_second']:.2f}")
    print(f"a/c (ours / HF Trainer, dynamic padding, 4 x 4) = {ours / results['dynamic']['tokens_per_second']:.2f}")
    print(
        f"a/c' (ours / HF Trainer, dynamic padding, 16 x 1) = {ours / results['dynamic-16x1']['tokens_per_second']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
