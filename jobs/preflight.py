"""Check a run before it trains: ``python -m jobs.preflight --config PATH [key=value ...]``.

Prints rows per split and tag, token-length percentiles, truncated/skipped/bad rows, the resolved LoRA
targets and trainable parameters, the memory one worker needs, and the number of optimizer steps. Exits 1
with every problem found (bad rows, unknown target modules, a config error), each with its fix.
Nothing here loads model weights: the architecture is built on the meta device.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from data.dataset import PreparedData, prepare
from data.formats import DataError, describe_bad_rows
from data.tokenize import (
    OverlengthError,
    TokenizeSettings,
    batch_order,
    length_stats,
    tag_counts,
    useful_fraction,
)
from jobs.loop import steps_per_epoch, total_steps
from qlora_ray import cli
from qlora_ray.config import Config, pin_local_paths
from qlora_ray.errors import QloraRayError
from qlora_ray.model import (
    ModelError,
    check_vocabulary,
    compute_dtype,
    linear_layers,
    load_tokenizer,
    lora_parameter_count,
    model_skeleton,
    resolve_targets,
)
from qlora_ray.runtime import start_ray

GIB = 1024**3

log = logging.getLogger(__name__)


@dataclass
class PreflightResult:
    """What preflight found: ``errors`` empty means the run may start."""

    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    optimizer_steps: int = 0
    trainable_params: int = 0
    memory_bytes: int = 0
    data: PreparedData | None = None
    tokenizer: Any = None

    @property
    def ok(self) -> bool:
        return not self.errors


def run_preflight(cfg: Config) -> PreflightResult:
    """Run every check and collect the problems instead of stopping at the first."""
    result = PreflightResult()
    result.lines.append(f"model        {cfg.model.name_or_path} ({cfg.model.quantization})")
    tokenizer = skeleton = None
    try:
        tokenizer = result.tokenizer = load_tokenizer(cfg.model)
        skeleton = model_skeleton(cfg.model)
        check_vocabulary(skeleton, tokenizer, cfg.model.name_or_path)
    except ModelError as err:
        result.errors.append(str(err))
    targets = _check_lora(cfg, skeleton, result) if skeleton is not None else None
    if tokenizer is not None:
        _check_data(cfg, tokenizer, result)
    if targets is not None and result.data is not None and result.data.train_rows:
        _estimate(cfg, skeleton, result)
    return result


class PreflightError(QloraRayError, RuntimeError):
    """A run that cannot start; the message lists every problem preflight found, each with its fix."""


def prepare_run(cfg: Config) -> tuple[Config, PreflightResult]:
    """Resolve local paths and run the preflight (data, targets, memory); raise with every problem found.

    The config returned has ``data.format`` resolved (``auto`` becomes the detected format): it is saved with
    the adapter, and Serve and evaluation build prompts by it.
    """
    cfg = pin_local_paths(cfg)
    start_ray()  # before the data: a large dataset is tokenised on Ray Data, which would start a Ray of its own
    check = run_preflight(cfg)
    for line in check.lines:
        log.info("%s", line)
    if check.errors:
        raise PreflightError("the run cannot start:\n" + "\n".join(f"- {e}" for e in check.errors))
    assert check.data is not None
    if not check.data.holdout_rows:
        raise PreflightError("no holdout rows to evaluate on: set data.holdout_fraction > 0 (e.g. 0.1)")
    if cfg.data.format == "auto":
        cfg = cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"format": check.data.holdout_examples[0]["format"]})}
        )
    return cfg, check


def _check_lora(cfg: Config, skeleton: Any, result: PreflightResult) -> dict[str, Any] | None:
    try:
        targets = resolve_targets(skeleton, cfg.lora, cfg.model.name_or_path)
    except ModelError as err:
        result.errors.append(str(err))
        return None
    names = sorted({n.rsplit(".", 1)[-1] for n in targets})
    result.trainable_params = lora_parameter_count(targets, cfg.lora.r)
    total = sum(p.numel() for p in skeleton.parameters())
    result.lines.append(
        f"lora         r={cfg.lora.r} alpha={cfg.lora.alpha:g} dropout={cfg.lora.dropout:g} on {', '.join(names)} "
        f"({len(targets)} layers)"
    )
    result.lines.append(
        f"trainable    {result.trainable_params:,} parameters ({100 * result.trainable_params / total:.2f}% of "
        f"{total:,})"
    )
    return targets


def _check_data(cfg: Config, tokenizer: Any, result: PreflightResult) -> None:
    try:
        data = prepare(cfg.data, tokenizer, TokenizeSettings.from_config(cfg))
    except (DataError, OverlengthError, ValueError) as err:
        result.errors.append(str(err))
        return
    result.data = data
    loaded, report = data.loaded, data.report
    result.lines.append(f"data         {loaded.source} (format {loaded.format})")
    result.lines.append(
        f"rows         {len(loaded.examples)} usable: train {len(data.train_examples)}, "
        f"holdout {len(data.holdout_examples)}; bad {len(loaded.bad_rows)}, truncated {report.truncated}, "
        f"skipped as too long {report.skipped}"
    )
    train_tags, holdout_tags = tag_counts(data.train_examples), tag_counts(data.holdout_examples)
    for tag in sorted(set(train_tags) | set(holdout_tags)):
        result.lines.append(f"  tag {tag:<16} train {train_tags[tag]:>6}  holdout {holdout_tags[tag]:>6}")
    if loaded.bad_rows:
        result.lines.append("skipped (data.on_bad_rows: skip) " + describe_bad_rows(loaded.bad_rows))
    for outcome, where in report.examples.items():
        result.lines.append(f"  {outcome} e.g. {', '.join(where)}")
    if not data.train_rows:
        result.errors.append("no training rows are left; lower data.holdout_fraction or add data")
        return
    lengths = [len(r["input_ids"]) for r in data.train_rows]
    stats = length_stats(lengths)
    result.lines.append(
        "tokens       per row p50 {p50}, p90 {p90}, p99 {p99}, max {max} (train.max_seq_len {cap})".format(
            **stats, cap=cfg.train.max_seq_len
        )
    )
    batches = batch_order(lengths, cfg.train.batch_size, cfg.train.seed, cfg.train.group_by_length)
    result.lines.append(
        f"padding      {100 * useful_fraction(lengths, batches):.1f}% of batch positions are real tokens "
        f"(padding every row to max_seq_len: {100 * sum(lengths) / (len(lengths) * cfg.train.max_seq_len):.1f}%)"
    )


def optimizer_steps(cfg: Config, train_rows: int) -> int:
    """Optimizer steps of the run, counted exactly as the training loop counts them."""
    return total_steps(cfg, steps_per_epoch(train_rows // cfg.train.num_workers, cfg))


def estimate_memory(cfg: Config, skeleton: Any, lora_params: int, longest_row: int) -> int:
    """Rough peak memory of one worker in bytes: weights, LoRA training state, activations and logits."""
    device = "cuda" if cfg.train.use_gpu else "cpu"
    act_bytes = compute_dtype(cfg.model, device).itemsize
    quantized = set(linear_layers(skeleton).values()) if cfg.model.quantization == "nf4" else set()
    # NF4: 4 bits per weight plus one scale per 64 weights (8 bits with double quantisation, else 32).
    nf4_bytes = 0.5 + (1 if cfg.model.double_quant else 4) / 64
    weights = sum(m.weight.numel() * nf4_bytes for m in quantized)
    quantized_ids = {id(m.weight) for m in quantized}
    # prepare_model_for_kbit_training keeps the remaining (non-4-bit) weights in float32.
    other_bytes = 4 if cfg.model.quantization == "nf4" else act_bytes
    weights += sum(p.numel() * other_bytes for p in skeleton.parameters() if id(p) not in quantized_ids)
    optimizer_state = 2 if cfg.train.optimizer == "paged_adamw_8bit" else 8
    training_state = lora_params * (4 + 4 + optimizer_state)  # fp32 weights and grads, then Adam's two moments
    config = skeleton.config
    tokens = cfg.train.batch_size * longest_row
    hidden, layers = config.hidden_size, config.num_hidden_layers
    ffn = getattr(config, "intermediate_size", None) or 4 * hidden
    per_layer = tokens * (4 * hidden + 2 * ffn) * act_bytes  # one layer's activations live at a time
    kept = layers * tokens * hidden * act_bytes if cfg.model.gradient_checkpointing else layers * per_layer
    logits = 3 * tokens * config.vocab_size * 4  # float32 logits (at most every position labelled), softmax, grad
    return int(weights + training_state + per_layer + kept + logits)


def _estimate(cfg: Config, skeleton: Any, result: PreflightResult) -> None:
    data = result.data
    assert data is not None
    longest = max(len(r["input_ids"]) for r in data.train_rows)
    result.memory_bytes = estimate_memory(cfg, skeleton, result.trainable_params, longest)
    result.optimizer_steps = optimizer_steps(cfg, len(data.train_rows))
    device = "GPU" if cfg.train.use_gpu else "CPU"
    result.lines.append(
        f"memory       about {result.memory_bytes / GIB:.2f} GiB per worker ({device}, batch "
        f"{cfg.train.batch_size} x {longest} tokens at most)"
    )
    _check_fits(cfg, skeleton, result)
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.num_workers
    result.lines.append(
        f"steps        {result.optimizer_steps} optimizer steps ({per_step} rows per step = batch "
        f"{cfg.train.batch_size} x accum {cfg.train.grad_accum} x workers {cfg.train.num_workers})"
    )


def _check_fits(cfg: Config, skeleton: Any, result: PreflightResult) -> None:
    """Refuse, before any weights load, a run that cannot fit: too long for the model, or out of memory."""
    positions = getattr(skeleton.config, "max_position_embeddings", None)
    if positions and cfg.train.max_seq_len > positions:
        result.errors.append(
            f"train.max_seq_len {cfg.train.max_seq_len} exceeds the {positions} positions of "
            f"{cfg.model.name_or_path}; set train.max_seq_len <= {positions}"
        )
    available, where = _available_memory(cfg)
    if available and result.memory_bytes > available:
        result.errors.append(
            f"the run needs about {result.memory_bytes / GIB:.1f} GiB per worker but {where} has "
            f"{available / GIB:.1f} GiB available; lower train.batch_size (raising train.grad_accum keeps the "
            "effective batch), lower train.max_seq_len, or set model.gradient_checkpointing: true"
        )


def _available_memory(cfg: Config) -> tuple[int, str]:
    """Memory one worker can use here, or 0 when this process cannot know (a remote cluster, no local GPU)."""
    import psutil
    import torch

    if cfg.train.use_gpu:
        if not torch.cuda.is_available():
            return 0, ""
        return torch.cuda.get_device_properties(0).total_memory, "one GPU of this machine"
    if os.environ.get("RAY_ADDRESS"):
        return 0, ""
    workers = cfg.train.num_workers
    return psutil.virtual_memory().available // workers, f"this machine (per worker of {workers})"


def main(argv: list[str] | None = None, prog: str = "python -m jobs.preflight") -> int:
    args = cli.parser(prog, cli.description(__doc__)).parse_args(argv)
    return cli.run(args, lambda: _check(cli.load(args, "preflight")))


def _check(cfg: Config) -> int:
    result = run_preflight(cfg)
    print("\n".join(result.lines))
    if result.errors:
        raise PreflightError(
            f"preflight FAILED with {len(result.errors)} problem(s):\n" + "\n".join(f"- {e}" for e in result.errors)
        )
    print("\npreflight passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
