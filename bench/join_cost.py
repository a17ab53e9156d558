"""What a row joining a running batch costs: ``DecodeBatch.add``'s prefill, and its copy of the batch's cache.

    .venv/bin/python bench/join_cost.py [--repeats 7] [--scales 16x116,64x512] [--threads 1 --clock cpu]

The starter model of configs/quickstart.yaml loaded as a CPU replica serves it (``load_inference_model``:
unquantised float32) with the replica's torch threads (``serve.cpus_per_replica``). For each scale (rows x
context), a running batch of rows-1 rows (prompts spread over a range of lengths, then 16 decode steps, so the
cache is ``context`` columns wide) takes one more row, as a replica does when a request arrives. Measured,
as medians and minimums of ``--repeats`` interleaved runs (the batch is put back as it was after each):

- step: one decode step of the full batch (``DecodeBatch.step``);
- join: the whole ``add`` of one row, split into its prefill forward, ``_merged`` (the per-layer ``torch.cat``
  of the running batch's whole key/value cache with the new row's, left-padded) and the rest (sampling, the
  first chunk, the commit);
- a step's own cache copy: transformers' ``DynamicLayer.update`` concatenates every layer's cache with the new
  column at every step, so each step already copies the whole cache once; timed alone for comparison.

The copy's share is given two ways: of one request's latency (its prefill + ``--decode-steps`` steps of the full
batch), and of the replica's time per request in a steady state where every request joins alone (its join +
its 1/rows share of ``--decode-steps`` steps). EOS is ignored so that no row leaves the batch while timing.

On a machine other work keeps busy, two torch threads wait on each other (a descheduled thread stalls every
parallel op) and wall times mean little: ``--threads 1 --clock cpu`` times the process's own CPU time instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GENERATED = 16  # decode steps the running rows have already taken


def parse_scale(text: str) -> tuple[int, int]:
    rows, context = text.lower().split("x")
    return int(rows), int(context)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scales", default="16x116,64x512", help="rows x context width, comma-separated")
    parser.add_argument("--decode-steps", type=int, default=23, help="decode steps of one request")
    parser.add_argument("--threads", type=int, help="torch threads (default: serve.cpus_per_replica, as served)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU time, not what other work takes (with --threads 1)")  # fmt: skip
    args = parser.parse_args()

    import torch

    from qlora_ray.config import load_config
    from qlora_ray.generate import load_inference_model
    from qlora_ray.model import load_tokenizer

    cfg = load_config(REPO / "configs/quickstart.yaml")
    torch.set_num_threads(args.threads or max(1, round(cfg.serve.cpus_per_replica)))  # as Generator does
    model = load_inference_model(cfg.model)  # on CPU: quantization "none", float32
    tokenizer = load_tokenizer(cfg.model)
    text = (REPO / "data/samples/faq.jsonl").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    dtype = next(model.parameters()).dtype
    print(f"model {cfg.model.name_or_path} ({dtype}, quantization as served on CPU: none), "
          f"{torch.get_num_threads()} torch threads, {args.repeats} repeats, {args.clock} clock")  # fmt: skip

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    results = [measure(model, tokenizer, ids, *parse_scale(s), args.repeats, clock) for s in args.scales.split(",")]
    n = args.decode_steps
    for stat in ("median", "min"):
        print(f"\n{stat}s of {args.repeats} runs")
        print("| rows x context | cache of the running rows (MB) | step (ms) | join: add (ms) | prefill forward (ms) "
              "| _merged copy (ms) | rest of add (ms) | a step's own cache copy (ms) | copy / add |"
              f" copy / request latency (prefill + {n} steps) | copy / replica time per request (add + {n}/rows "
              "steps) |")  # fmt: skip
        print("| --- " * 11 + "|")
        for r in results:
            m = r[stat]
            latency = m["forward"] + n * m["step"]
            replica = m["add"] + n * m["step"] / r["rows"]
            print(f"| {r['rows']} x {r['width']} | {r['mb']:.0f} | {m['step']:.1f} | {m['add']:.1f} "
                  f"| {m['forward']:.1f} | {m['merged']:.1f} | {m['add'] - m['forward'] - m['merged']:.1f} "
                  f"| {m['own_copy']:.1f} | {m['merged'] / m['add']:.1%} | {m['merged'] / latency:.2%} "
                  f"| {m['merged'] / replica:.2%} |")  # fmt: skip
    return 0


def measure(model, tokenizer, ids: list[int], rows: int, width: int, repeats: int, clock) -> dict:
    """Medians (ms) for a batch of ``rows`` rows, ``width`` cache columns wide, after the last row joins."""
    import torch

    from qlora_ray.generate import DecodeBatch, Sampling

    longest = width - GENERATED
    shortest = max(1, longest - max(8, longest * 2 // 5))  # e.g. 60..100 tokens at a width of 116
    lengths = [shortest + (longest - shortest) * i // max(1, rows - 2) for i in range(rows - 1)]
    prompt = lambda n, at: [ids[(at * 37 + k) % len(ids)] for k in range(n)]  # noqa: E731
    sampling = Sampling(max_tokens=1 << 30, temperature=0)  # no row ends while timing

    started = time.perf_counter()
    batch = DecodeBatch(model, tokenizer)
    batch.eos = set()
    for first in range(0, rows - 1, 8):  # the running rows, in joins of up to 8 (prefill memory)
        group = range(first, min(rows - 1, first + 8))
        batch.add(list(group), [prompt(lengths[i], i) for i in group], [sampling] * len(group))
    for _ in range(GENERATED):
        batch.step()
    assert len(batch) == rows - 1 and batch.mask.shape[1] == width, (len(batch), batch.mask.shape)
    layer = batch.cache.layers[0]
    mb = 2 * len(batch.cache.layers) * layer.keys.numel() * layer.keys.element_size() / 2**20
    print(f"{rows - 1} running rows, prompts {shortest}..{longest} tokens + {GENERATED} generated, cache "
          f"{tuple(layer.keys.shape)} x {len(batch.cache.layers)} layers x k/v = {mb:.0f} MB; "
          f"built in {time.perf_counter() - started:.0f} s")  # fmt: skip

    new = prompt((shortest + longest) // 2, rows)  # the joining request: a prompt of the middle length
    timed: dict[str, float] = {}

    def timing(name, fn):
        def wrapper(*a, **kw):
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                timed[name] = clock() - t0

        return wrapper

    def snapshot():
        return ([(la.keys, la.values) for la in batch.cache.layers], batch.mask, batch.positions, batch.tokens)

    def restore(saved):
        layers, batch.mask, batch.positions, batch.tokens = saved
        for la, (k, v) in zip(batch.cache.layers, layers, strict=True):
            la.keys, la.values = k, v

    def one_step() -> float:
        saved = snapshot()
        t0 = clock()
        batch.step()
        elapsed = clock() - t0
        restore(saved)  # the step made new tensors (DynamicLayer.update concatenates): the old ones are intact
        return elapsed

    def one_join() -> dict[str, float]:
        batch._forward, batch._merged = timing("forward", DecodeBatch._forward.__get__(batch)), timing(
            "merged", DecodeBatch._merged.__get__(batch))  # fmt: skip
        t0 = clock()
        try:
            batch.add(["joining"], [new], [sampling])
            timed["add"] = clock() - t0
        finally:
            del batch._forward, batch._merged
        assert len(batch) == rows
        batch.drop({"joining"})  # back to the running rows (not timed)
        assert batch.mask.shape[1] == width
        return dict(timed)

    def own_copy() -> float:
        """What DynamicLayer.update does to every layer at every step: cat the cache with one new column."""
        column = [(la.keys[:, :, -1:].clone(), la.values[:, :, -1:].clone()) for la in batch.cache.layers]
        t0 = clock()
        out = [(torch.cat([la.keys, k], -2), torch.cat([la.values, v], -2))
               for la, (k, v) in zip(batch.cache.layers, column, strict=True)]  # fmt: skip
        elapsed = clock() - t0
        del out
        return elapsed

    one_step(), one_join(), own_copy()  # warm-up
    steps, joins, copies = [], [], []
    for _ in range(repeats):  # interleaved, so that noise from other work on the machine hits each alike
        steps.append(one_step())
        joins.append(one_join())
        copies.append(own_copy())
    stats = {}
    for stat, fn in (("median", statistics.median), ("min", min)):
        stats[stat] = {"step": 1e3 * fn(steps), "own_copy": 1e3 * fn(copies),
                       **{k: 1e3 * fn([j[k] for j in joins]) for k in ("add", "forward", "merged")}}  # fmt: skip
    return {"rows": rows, "width": width, "mb": mb, **stats}


if __name__ == "__main__":
    sys.exit(main())
