"""Serve load: our Serve app under concurrent streaming clients against one-at-a-time ``model.generate``.

    .venv/bin/python bench/serve_load.py [--adapter runs/quickstart/adapter] [--seconds 30]

Model: the starter model with the quickstart adapter (``make quickstart`` writes it), registered into a
temporary registry. Prompts: the questions of the sample FAQ set, ``--max-tokens`` new tokens at most.

- ``baseline`` (first, alone on the machine): the seed chatbot's way, one request at a time through
  ``model.generate`` on the same base and adapter, for ``--seconds``.
- ``serve``: the app on a local Ray (one generator replica with every core), ``c`` client threads each sending
  streaming chat requests back to back for ``--seconds``, c in 1, 4, 16, 64: requests/s, output tokens/s,
  latency p50/p95/p99 and time to first token.
- ``autoscaling``: the app with ``serve.autoscaling`` (1 to 2 one-CPU replicas), 16 clients for
  ``--scale-seconds``; the running replica count over time.

Goal: at concurrency 16, >= 4x the baseline's output tokens/s with p99 latency under 3x the baseline's latency.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONCURRENCY = [1, 4, 16, 64]


def prompts() -> list[str]:
    rows = [json.loads(line) for line in (REPO / "data/samples/faq.jsonl").read_text().splitlines() if line.strip()]
    return [row["prompt"] for row in rows]


def registry_with(adapter: Path, home: Path) -> tuple[str, str]:
    """A registry in ``home`` holding the adapter as 'quickstart'; returns (registry, base model)."""
    from qlora_ray.config import load_config
    from qlora_ray.registry import Registry

    cfg = load_config(adapter / "qlora_ray_config.yaml")
    metrics = json.loads((adapter / "metrics.json").read_text()) if (adapter / "metrics.json").exists() else {}
    manifest = {"base_model": cfg.model.name_or_path, "metrics": {k: v for k, v in metrics.items()
                                                                     if isinstance(v, (int, float))}}  # fmt: skip
    registry = str(home / "registry")
    Registry(registry).register("quickstart", adapter, manifest)
    return registry, cfg.model.name_or_path


def run_baseline(adapter: Path, seconds: float, max_tokens: int) -> dict:
    """One request at a time through ``model.generate`` on the base + adapter, greedy, for ``seconds``."""
    import torch

    from data.tokenize import encode_prompt
    from qlora_ray.config import load_config
    from qlora_ray.generate import AdapterSet, load_inference_model
    from qlora_ray.model import load_tokenizer

    cfg = load_config(adapter / "qlora_ray_config.yaml")
    torch.set_num_threads(2)
    tokenizer = load_tokenizer(cfg.model)
    adapters = AdapterSet(load_inference_model(cfg.model))
    adapters.load("quickstart", adapter)
    model = adapters.model
    latencies, tokens, start = [], 0, time.perf_counter()
    for prompt in _cycle(prompts()):
        if time.perf_counter() - start > seconds:
            break
        began = time.perf_counter()
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        latencies.append(time.perf_counter() - began)
        tokens += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "tokens_per_s": tokens / elapsed, "requests_per_s": len(latencies) / elapsed,
            "latency_p50": _pct(latencies, 50), "latency_p99": _pct(latencies, 99)}  # fmt: skip


def _cycle(items: list[str]):
    while True:
        yield from items


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def stream_once(url: str, prompt: str, max_tokens: int, key: str | None = None) -> tuple[float, float, int, int]:
    """One streaming chat request: (latency, time to first token, output tokens, HTTP status)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    began, first, tokens = time.perf_counter(), None, 0
    with requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, stream=True, timeout=600) as reply:
        if reply.status_code != 200:
            return time.perf_counter() - began, float("nan"), 0, reply.status_code
        for line in reply.iter_lines(decode_unicode=True):
            if not line or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - began
    latency = time.perf_counter() - began
    return latency, first if first is not None else latency, tokens, 200


def load(
    url: str, concurrency: int, seconds: float, max_tokens: int, key: str | None = None, stop_at: float | None = None
) -> dict:
    """``concurrency`` closed-loop clients for ``seconds`` (or until ``stop_at``); only requests that finish in the
    window count. A request that gets no HTTP answer counts as an error with status 0."""
    results: list[tuple[float, float, int, int]] = []
    stop_at = stop_at or time.perf_counter() + seconds
    lock = threading.Lock()

    def client(offset: int) -> None:
        source = _cycle(prompts()[offset:] + prompts()[:offset])
        while time.perf_counter() < stop_at:
            try:
                outcome = stream_once(url, next(source), max_tokens, key=key)
            except requests.RequestException:
                outcome = (0.0, 0.0, 0, 0)
            if time.perf_counter() <= stop_at:
                with lock:
                    results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = min(time.perf_counter(), stop_at) - started
    ok = [r for r in results if r[3] == 200]
    latencies, ttfts = [r[0] for r in ok], [r[1] for r in ok]
    return {
        "concurrency": concurrency, "requests": len(ok), "errors": len(results) - len(ok),
        "error_statuses": dict(Counter(r[3] for r in results if r[3] != 200)),
        "requests_per_s": len(ok) / elapsed, "tokens_per_s": sum(r[2] for r in ok) / elapsed,
        "latency_p50": _pct(latencies, 50), "latency_p95": _pct(latencies, 95), "latency_p99": _pct(latencies, 99),
        "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99),
    }  # fmt: skip


def deploy(registry: str, base: str, port: int, overrides: list[str]) -> str:
    """(Re)deploy the app as ``python -m serve`` does; its URL once it is healthy."""
    from qlora_ray.config import load_config
    from serve.__main__ import run_serve, wait_healthy

    cfg = load_config(REPO / "configs/quickstart.yaml", [f"run.registry={registry}", f"model.name_or_path={base}",
                                                          f"serve.port={port}", *overrides])  # fmt: skip
    url, _ = run_serve(cfg)
    if not wait_healthy(url, 300):
        raise RuntimeError("the app did not become healthy in 300 s")
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replicas() -> int:
    from ray import serve

    status = serve.status().applications["qlora-ray"].deployments["Generator"]
    return status.replica_states.get("RUNNING", 0)


def autoscaling(url: str, seconds: float, max_tokens: int) -> list[tuple[float, int]]:
    """Replica count every 2 s under 16 clients."""
    timeline: list[tuple[float, int]] = []
    done = threading.Event()
    start = time.perf_counter()

    def watch() -> None:
        while not done.is_set():
            timeline.append((round(time.perf_counter() - start), replicas()))
            time.sleep(2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    load(url, 16, seconds, max_tokens)
    done.set()
    watcher.join()
    return timeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", default=str(REPO / "runs/quickstart/adapter"), help="adapter directory")
    parser.add_argument("--seconds", type=float, default=30, help="duration of each load level")
    parser.add_argument("--scale-seconds", type=float, default=60, help="duration of the autoscaling run")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    adapter = Path(args.adapter)
    if not (adapter / "adapter_model.safetensors").exists():
        print(f"error: no adapter at {adapter}: run `make quickstart` first, or pass --adapter DIR", file=sys.stderr)
        return 1

    baseline = run_baseline(adapter, args.seconds, args.max_tokens)
    print(f"baseline: {json.dumps(baseline)}", flush=True)

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory() as home:
        registry, base = registry_with(adapter, Path(home))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        url = deploy(registry, base, port, ["serve.cpus_per_replica=2"])
        stream_once(url, prompts()[0], args.max_tokens)  # warm-up: the adapter loads on first use
        levels = []
        for c in CONCURRENCY:
            levels.append(load(url, c, args.seconds, args.max_tokens))
            print(f"serve: {json.dumps(levels[-1])}", flush=True)
        url = deploy(registry, base, port, [
            "serve.cpus_per_replica=1", "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=2",
            "serve.autoscaling.target_ongoing_requests=4", "serve.autoscaling.upscale_delay_s=3",
        ])  # fmt: skip
        stream_once(url, prompts()[0], args.max_tokens)
        timeline = autoscaling(url, args.scale_seconds, args.max_tokens)
        serve.shutdown()
        ray.shutdown()

    print(
        "\n| concurrency | requests/s | output tokens/s | latency p50 / p95 / p99 (s) | TTFT p50 / p99 (s) | errors |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| baseline (1, model.generate) | {baseline['requests_per_s']:.2f} | {baseline['tokens_per_s']:.1f} | "
          f"{baseline['latency_p50']:.2f} / - / {baseline['latency_p99']:.2f} | - | 0 |")  # fmt: skip
    for r in levels:
        print(f"| {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['latency_p50']:.2f} / "
              f"{r['latency_p95']:.2f} / {r['latency_p99']:.2f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
              f"{r['errors']} |")  # fmt: skip
    at16 = next(r for r in levels if r["concurrency"] == 16)
    speedup = at16["tokens_per_s"] / baseline["tokens_per_s"]
    latency = at16["latency_p99"] / baseline["latency_p50"]
    print(f"\nat 16: output tokens/s {speedup:.2f}x the baseline (goal >= 4); p99 latency {latency:.2f}x the "
          "baseline's single-request latency (goal < 3)")  # fmt: skip
    print("replicas over time (s: running):", ", ".join(f"{t}: {n}" for t, n in timeline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
