"""Training throughput: our loop on Ray Train against the seed recipe and HF Trainer at its best settings.

    .venv/bin/python bench/train_throughput.py --data ../shared/seed-data/galaxy_alibaba_qa.json

Every variant trains the same model with the same LoRA adapter (built by ``qlora_ray.model``), the same
optimizer (paged AdamW 8-bit, constant lr 2e-4, grad norm 0.3) and 16 rows per optimizer step, each in its
own process. Gradient checkpointing is off (as in the quickstart config) except for the seed recipe, which
kept it on:

- ``ours``: ``jobs.train.run_train`` (Ray Train, one worker): completion-only labels, per-batch padding,
  length-grouped batches, 16 rows per micro-batch (padding no longer eats the memory for that), logits
  only at labelled positions, skip-sampled LoRA dropout on CPU (``jobs.dropout``).
- ``ours-loop-no-ray``: the same loop (``jobs.loop.train``) in a plain process: the cost of Ray on top.
- ``ours-loop-no-ray-fp32``: the same, with ``model.quantization=none``: the base unquantised, in float32
  (``compute_dtype: auto`` on CPU). Against ``ours-loop-no-ray`` (NF4) it is the QLoRA A/B on CPU.
- ``seed``: the seed recipe as written: HF ``Trainer`` with ``DataCollatorForLanguageModeling``, prompt and
  completion as one text, every row padded to 512 tokens, pad token = EOS, random order.
- ``dynamic``: HF ``Trainer`` on our tokenised rows (completion-only labels) at its best settings:
  per-batch (dynamic) padding and ``train_sampling_strategy="group_by_length"`` (transformers 5's form of
  ``group_by_length=True``), 4 x 4 as the recipe; ``dynamic-16x1`` the same with 16 rows per micro-batch.
  Stock peft LoRA (``nn.Dropout``) and the model's full-logits loss.

Timing, the same for every variant: each runs 2N optimizer steps (N = ``--steps``). The first N are
warm-up and not timed; the clock runs from the end of optimizer step N to the end of step 2N, and counts the
non-pad tokens of the micro-batches of steps N+1..2N. Ours reads this from the loop's own throughput
window, which restarts after every holdout evaluation: the loop evaluates at step N (``train.eval_every=N``)
and at step 2N, so its last window is exactly steps N+1..2N (evaluations are outside every window; only the
last one saves a checkpoint). That window is why the warm-up is as long as the measurement: a shorter one
would need an evaluation inside the measured steps. HF Trainer is timed by a ``TrainerCallback`` at
``on_step_end`` of steps N and 2N, with tokens counted by a forward pre-hook on the model. Model loading,
tokenisation and Ray start-up are never timed. Peak memory is the peak resident memory of the process that
trains (the Ray worker for ``ours``), warm-up included.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.variants import run_variant  # noqa: E402

BATCH, ACCUM, LR, MAX_NORM, SEED_PAD = 4, 4, 2e-4, 0.3, 512
KEYS = ("tokens_per_second", "useful_token_fraction", "peak_memory_gb")


class Variant(NamedTuple):
    runner: str  # "ours" (Ray Train), "loop" (in-process loop), "seed" or "dynamic" (HF Trainer)
    batch: int  # rows per micro-batch
    accum: int  # micro-batches per optimizer step: every variant takes 16 rows per step
    overrides: tuple[str, ...] = ()
    label: str = ""


VARIANTS = {
    "ours": Variant("ours", 16, 1, label="(a) ours: Ray Train, one worker"),
    "ours-loop-no-ray": Variant("loop", 16, 1, label="ours: the same loop without Ray (NF4 base)"),
    "ours-loop-no-ray-fp32": Variant(
        "loop", 16, 1, ("model.quantization=none",), "ours: the same loop without Ray, unquantised fp32 base"
    ),
    "seed": Variant("seed", BATCH, ACCUM, label="(b) seed recipe: HF Trainer, pad to 512"),
    "dynamic": Variant("dynamic", BATCH, ACCUM, label="(c) HF Trainer, dynamic padding, group_by_length"),
    "dynamic-16x1": Variant("dynamic", 16, 1, label="(c') HF Trainer, dynamic padding, group_by_length"),
}


def _config(data: str, steps: int, variant: Variant, *extra: str):
    """The seed FAQ recipe's training settings on the quickstart config (starter model, no checkpointing).

    ``steps`` warm-up steps, then ``steps`` measured ones. The evaluation at the end of the warm-up restarts
    the loop's throughput window; checkpoints only at the end (one checkpoint: its metrics are the window's).
    """
    from qlora_ray.config import load_config

    return load_config(
        REPO / "configs/quickstart.yaml",
        [
            f"data.path={data}", "data.format=prompt_completion", "train.max_seq_len=512",
            f"train.batch_size={variant.batch}", f"train.grad_accum={variant.accum}",
            "train.optimizer=paged_adamw_8bit", f"train.lr={LR}", f"train.max_grad_norm={MAX_NORM}",
            "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.cpus_per_worker=2",
            f"train.max_steps={2 * steps}", f"train.eval_every={steps}", f"train.save_every={2 * steps}",
            # The seed recipe kept prepare_model_for_kbit_training's default: gradient checkpointing on.
            f"model.gradient_checkpointing={variant.runner == 'seed'}",
            *variant.overrides, *extra,
        ],
    )  # fmt: skip


def run_ours(data: str, steps: int, variant: Variant) -> dict:
    """Ray Train: the metrics reported with the run's only checkpoint are those of the measured window."""
    from jobs.train import run_train

    with tempfile.TemporaryDirectory() as storage:
        cfg = _config(data, steps, variant, f"run.storage_path={storage}", "run.name=bench-ours")
        metrics = run_train(cfg).metrics
    return {key: metrics[key] for key in KEYS}


def run_loop(cfg) -> dict:
    """Our training loop in this process, without Ray; it returns the last window's metrics."""
    from data.dataset import prepare
    from data.tokenize import TokenizeSettings
    from jobs.loop import seed_everything, train
    from qlora_ray.model import attach_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare(cfg.data, tokenizer, TokenizeSettings.from_config(cfg))
    base = load_model(cfg.model)
    seed_everything(cfg.train.seed)  # seeded after loading, as the Ray worker does: the same LoRA initialisation
    model = attach_lora(base, cfg)
    metrics = train(cfg, model, tokenizer, prepared.train_rows, prepared.holdout_rows, lambda metrics, directory: None)
    return {key: metrics[key] for key in KEYS}


def _trainer_rows(cfg, tokenizer, seed_recipe: bool) -> tuple[list[dict], object]:
    """The rows and collator HF Trainer trains on: the seed recipe's, or our tokenised rows."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

    from data.dataset import prepare
    from data.tokenize import TokenizeSettings

    prepared = prepare(cfg.data, tokenizer, TokenizeSettings.from_config(cfg))
    if not seed_recipe:
        # group_by_length reads each row's length as len(row["input_ids"]): our rows' lengths, no re-tokenising.
        rows = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in prepared.train_rows]
        return rows, DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    texts = [e["prompt"] + e["completion"] for e in prepared.train_examples]
    encoded = tokenizer(texts, padding="max_length", max_length=SEED_PAD, truncation=True)
    rows = [
        {"input_ids": i, "attention_mask": m}
        for i, m in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    return rows, DataCollatorForLanguageModeling(tokenizer, mlm=False)


def _count_tokens(model) -> dict[str, int]:
    """Non-pad tokens and padded positions of every forward: what the optimizer steps actually consumed.

    Counted at the forward, not in the collator: the data loader collates one batch ahead of the step.
    """
    counts = {"tokens": 0, "positions": 0}

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        counts["tokens"] += int(mask.sum())
        counts["positions"] += mask.numel()

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


def _step_clock(warmup: int, counts: dict[str, int]):
    """A callback reading the clock and the token counts at the end of the warm-up and of the last step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[str, tuple[float, dict[str, int]]] = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, args.max_steps):
                self.marks["start" if state.global_step == warmup else "end"] = (time.perf_counter(), dict(counts))

    return StepClock()


def run_trainer(cfg, steps: int, seed_recipe: bool) -> dict:
    """HF Trainer on the same model, LoRA, optimizer and rows; ``steps`` warm-up steps, then ``steps`` timed."""
    import torch
    from transformers import Trainer, TrainingArguments

    from qlora_ray.model import attach_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    rows, collator = _trainer_rows(cfg, tokenizer, seed_recipe)
    base = load_model(cfg.model)
    torch.manual_seed(cfg.train.seed)  # the LoRA initialisation of ours
    model = attach_lora(base, cfg)
    counts = _count_tokens(model)
    clock = _step_clock(steps, counts)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.train.batch_size,
            gradient_accumulation_steps=cfg.train.grad_accum, max_steps=2 * steps, learning_rate=LR,
            max_grad_norm=MAX_NORM, optim="paged_adamw_8bit", lr_scheduler_type="constant",
            # The seed recipe as written samples at random; the dynamic variants get HF's length grouping.
            train_sampling_strategy="random" if seed_recipe else "group_by_length",
            logging_steps=cfg.train.logging_steps, save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, seed=cfg.train.seed,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[clock]).train()
    (start, before), (end, after) = clock.marks["start"], clock.marks["end"]
    tokens = after["tokens"] - before["tokens"]
    return {
        "tokens_per_second": tokens / (end - start),
        "useful_token_fraction": tokens / max(1, after["positions"] - before["positions"]),
        "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def run_one(name: str, data: str, steps: int) -> dict:
    variant = VARIANTS[name]
    if variant.runner == "ours":
        return run_ours(data, steps, variant)
    cfg = _config(data, steps, variant)
    if variant.runner == "loop":
        return run_loop(cfg)
    return run_trainer(cfg, steps, seed_recipe=variant.runner == "seed")


def epoch_tokens(data: str) -> int:
    from data.dataset import prepare
    from data.tokenize import TokenizeSettings
    from qlora_ray.model import load_tokenizer

    cfg = _config(data, 1, VARIANTS["ours"])
    prepared = prepare(cfg.data, load_tokenizer(cfg.model), TokenizeSettings.from_config(cfg))
    return sum(len(r["input_ids"]) for r in prepared.train_rows)


def print_table(results: dict[str, dict], tokens: int) -> None:
    print(f"\n| variant | rows x accumulation | useful tokens/s | useful-token share | epoch ({tokens} tokens) "
          "| peak memory |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        v = VARIANTS[name]
        minutes = tokens / r["tokens_per_second"] / 60
        print(f"| {v.label} | {v.batch} x {v.accum} | {r['tokens_per_second']:.1f} | "
              f"{r['useful_token_fraction']:.1%} | {minutes:.1f} min | {r['peak_memory_gb']:.2f} GiB |")  # fmt: skip


def print_ratios(results: dict[str, dict]) -> None:
    tps = {name: r["tokens_per_second"] for name, r in results.items()}
    best_hf = max(("dynamic", "dynamic-16x1"), key=tps.__getitem__)
    print(f"\nours / HF Trainer at its best ({best_hf}) = {tps['ours'] / tps[best_hf]:.2f}")
    print(f"ours / HF Trainer: dynamic 4 x 4 = {tps['ours'] / tps['dynamic']:.2f}, "
          f"dynamic 16 x 1 = {tps['ours'] / tps['dynamic-16x1']:.2f}")  # fmt: skip
    print(f"ours / seed recipe = {tps['ours'] / tps['seed']:.2f}")
    print(f"Ray overhead = {1 - tps['ours'] / tps['ours-loop-no-ray']:.1%} (ours / same loop without Ray = "
          f"{tps['ours'] / tps['ours-loop-no-ray']:.2f})")  # fmt: skip
    nf4, fp32 = results["ours-loop-no-ray"], results["ours-loop-no-ray-fp32"]
    print(f"nf4 / none (fp32): tokens/s {nf4['tokens_per_second'] / fp32['tokens_per_second']:.2f}, "
          f"peak memory {nf4['peak_memory_gb']:.2f} / {fp32['peak_memory_gb']:.2f} GiB "
          f"= {nf4['peak_memory_gb'] / fp32['peak_memory_gb']:.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/seed-data/galaxy_alibaba_qa.json"))
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps (16 rows each), after as many")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # one variant, in its own process, so peak memory is its own
        print("RESULT " + json.dumps(run_one(args.variant, args.data, args.steps)), flush=True)
        return 0
    results = {}
    for name in VARIANTS:
        result = run_variant(__file__, ["--variant", name, "--data", args.data, "--steps", str(args.steps)])
        if result is None:
            return 1
        results[name] = result
        print(f"{name}: {result}", flush=True)
    print_table(results, epoch_tokens(args.data))
    print_ratios(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
