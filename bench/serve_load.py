"""Serve load: our Serve app under concurrent streaming clients against one-at-a-time ``model.generate``.

    .venv/bin/python bench/serve_load.py [--adapter DIR] [--seconds 30]

Model: the starter model with the quickstart adapter (``make quickstart`` registers it) and a second adapter made
from it (every ``lora_B`` halved: the same shapes and compute, other answers), both registered into a temporary
registry. Prompts: the questions of the sample FAQ set, each sent as a chat request; greedy, ``--max-tokens``
new tokens at most.

- ``baseline`` (first, alone on the machine): one request at a time through ``model.generate``, at its best:
  the replica's model config and loader, the adapter merged into the base weights (``merge_and_unload``: a
  plain model), the prompt built from the same chat request by the server's own code (``prompt_for``), plain
  greedy decoding stopping at the server's stop tokens, as many torch threads as the replica. Once on the
  quickstart adapter, once alternating the two adapters (one merged model each: one at a time, a request never
  shares a model with the other adapter's, so no merge or unmerge is ever needed).
- ``serve``: the app on a local Ray (one generator replica with every core), ``c`` client threads each sending
  streaming chat requests back to back for ``--seconds``, c in 1, 4, 16, 64 on the quickstart adapter, then 16
  alternating the two adapters request by request (PEFT's mixed-adapter batches): requests/s, output tokens/s,
  latency p50/p95/p99 and time to first token.
- ``autoscaling``: the app with ``serve.autoscaling`` (1 to 2 one-CPU replicas), 16 clients for
  ``--scale-seconds``; the running replica count over time.

Both sides: one untimed warm-up request per adapter (the first FAQ question) before that adapter is measured,
then the same window (``--seconds``) per run. The baseline counts every request it starts in the window and
the time to its end; ours counts only requests that finish in the window (the work of those still running at
its end is lost to ours). Output tokens are the completion's tokens without the stop token, on both sides.

Goal: at concurrency 16, >= 4x the baseline's output tokens/s with p99 latency under 3x the baseline's latency
(its p50), for one adapter and for two adapters alternating (each against the baseline on the same adapters).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONCURRENCY = [1, 4, 16, 64]
ADAPTER, SECOND = "quickstart", "quickstart-half"  # registry names of the adapter and the one made from it


def prompts() -> list[str]:
    rows = [json.loads(line) for line in (REPO / "data/samples/faq.jsonl").read_text().splitlines() if line.strip()]
    return [row["prompt"] for row in rows]


def chat_body(prompt: str, max_tokens: int, model: str | None = None, stream: bool = True) -> dict:
    """The chat request both sides answer: ours over HTTP, the baseline through the server's prompt code."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    if model is not None:  # None: the server's default adapter (serve_abuse's requests)
        body["model"] = model
    return body


def quickstart_adapter() -> str:
    """Where ``make quickstart`` left its adapter: registered under ``quickstart`` in the quickstart config's
    registry (its sweep's best), else the train job's ``runs/quickstart/adapter``."""
    from qlora_ray.config import load_config
    from qlora_ray.registry import Registry

    registry = REPO / load_config(REPO / "configs/quickstart.yaml", []).run.registry
    entry = Registry(str(registry)).find("quickstart") if registry.exists() else None
    return entry.uri if entry is not None else str(REPO / "runs/quickstart/adapter")


def half_adapter(adapter: Path, home: Path) -> Path:
    """A second, distinct adapter: a copy of ``adapter`` with every ``lora_B`` weight halved. Its decode steps cost
    what the first's do (same shapes, same modules), but it answers differently, so the server must keep both
    apart: the mixed-adapter path."""
    from safetensors.torch import load_file, save_file

    directory = home / SECOND
    shutil.copytree(adapter, directory)
    weights = directory / "adapter_model.safetensors"
    tensors = {name: t * 0.5 if "lora_B" in name else t for name, t in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return directory


def registry_with(adapter: Path, home: Path, others: dict[str, Path] | None = None) -> tuple[str, str]:
    """A registry in ``home`` holding the adapter as 'quickstart' (and ``others`` by name, with its manifest);
    returns (registry, base model)."""
    from qlora_ray.config import load_config
    from qlora_ray.registry import Registry

    cfg = load_config(adapter / "qlora_ray_config.yaml")
    metrics = json.loads((adapter / "metrics.json").read_text()) if (adapter / "metrics.json").exists() else {}
    manifest = {"base_model": cfg.model.name_or_path, "metrics": {k: v for k, v in metrics.items()
                                                                     if isinstance(v, (int, float))}}  # fmt: skip
    registry = str(home / "registry")
    for name, directory in {ADAPTER: adapter, **(others or {})}.items():
        Registry(registry).register(name, directory, manifest)
    return registry, cfg.model.name_or_path


def serve_config(registry: str, base: str, overrides: list[str]) -> Any:
    """The config the app is deployed with; the baseline loads its model and builds its prompts by it too."""
    from qlora_ray.config import load_config

    return load_config(REPO / "configs/quickstart.yaml", [f"run.registry={registry}", f"model.name_or_path={base}",
                                                          *overrides])  # fmt: skip


class Baseline:
    """``model.generate`` one request at a time, at its best: one model per adapter, loaded as the replica loads its
    base, the adapter merged into it (``merge_and_unload``: a plain model, no LoRA layers left)."""

    def __init__(self, cfg: Any, adapters: dict[str, Path]):
        import torch

        from qlora_ray.generate import AdapterSet, eos_ids, load_inference_model
        from qlora_ray.model import load_tokenizer

        torch.set_num_threads(max(1, round(cfg.serve.cpus_per_replica)))  # as the replica does
        self.cfg, self.adapters = cfg, adapters
        self.tokenizer = load_tokenizer(cfg.model)
        self.models = {}
        for name, directory in adapters.items():
            loaded = AdapterSet(load_inference_model(cfg.model))
            loaded.load(name, directory)  # the replica's adapter loading (checks, safetensors only)
            self.models[name] = loaded.model.merge_and_unload().eval()
        self.eos = sorted(eos_ids(self.models[ADAPTER], self.tokenizer))  # the server's stop tokens

    def prompt(self, name: str, body: dict) -> list[int]:
        """The prompt ids the server builds for ``body`` on adapter ``name``: its request parsing, the adapter's
        saved prompt settings and ``serve.generator.prompt_for`` (the format's prompt, the chat template)."""
        from serve.generator import _prompt_settings, prompt_for
        from serve.protocol import ChatRequest, chat_messages

        settings = _prompt_settings(self.adapters[name])
        request = {"messages": chat_messages(ChatRequest.model_validate(body).messages)}
        tokenizer, limit = self.tokenizer, self.cfg.serve.max_prompt_tokens
        return prompt_for(request, settings.format, settings.template, tokenizer, limit)[1]

    def answer(self, name: str, prompt: str, max_tokens: int) -> tuple[float, int, str]:
        """One request, end to end: (latency, output tokens, text). Greedy with no logits processor (an explicit
        generation config: nothing of the model's own, such as a repetition penalty, applies), as the server."""
        import torch
        from transformers import GenerationConfig

        began = time.perf_counter()
        ids = torch.tensor([self.prompt(name, chat_body(prompt, max_tokens, name, stream=False))])
        settings = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=self.eos,
                                    pad_token_id=self.eos[0])  # fmt: skip
        with torch.inference_mode():
            out = self.models[name].generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             generation_config=settings)  # fmt: skip
        new = [t for t in out[0, ids.shape[1] :].tolist() if t not in self.eos]  # as the server counts them
        return time.perf_counter() - began, len(new), self.tokenizer.decode(new, skip_special_tokens=True)


def run_baseline(baseline: Baseline, names: list[str], seconds: float, max_tokens: int) -> dict:
    """Requests one at a time for ``seconds``, alternating ``names``' adapters, after one untimed warm-up request
    per adapter (the same warm-up ours gets); the warm-up answers are kept to compare with ours."""
    answers = {name: baseline.answer(name, prompts()[0], max_tokens)[2] for name in names}
    latencies, tokens, start = [], 0, time.perf_counter()
    for i, prompt in enumerate(_cycle(prompts())):
        if time.perf_counter() - start > seconds:
            break
        latency, count, _ = baseline.answer(names[i % len(names)], prompt, max_tokens)
        latencies.append(latency)
        tokens += count
    elapsed = time.perf_counter() - start
    return {"adapters": names, "requests": len(latencies), "tokens_per_s": tokens / elapsed,
            "requests_per_s": len(latencies) / elapsed, "latency_p50": _pct(latencies, 50),
            "latency_p99": _pct(latencies, 99), "answers": answers}  # fmt: skip


def _cycle(items: list[str]):
    while True:
        yield from items


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def stream_once(
    url: str, prompt: str, max_tokens: int, key: str | None = None, model: str | None = None
) -> tuple[float, float, int, int]:
    """One streaming chat request: (latency, time to first token, output tokens, HTTP status). A stream that fails
    after its 200 (an error event, or no ``[DONE]``) has status -1: a failed request, not a short answer."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = chat_body(prompt, max_tokens, model)
    began, first, tokens, done = time.perf_counter(), None, 0, False
    with requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, stream=True, timeout=600) as reply:
        if reply.status_code != 200:
            return time.perf_counter() - began, float("nan"), 0, reply.status_code
        for line in reply.iter_lines(decode_unicode=True):
            done = done or line == "data: [DONE]"
            if not line or done:
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return time.perf_counter() - began, float("nan"), 0, -1
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - began
    latency = time.perf_counter() - began
    return latency, first if first is not None else latency, tokens, 200 if done else -1


def answer(url: str, prompt: str, max_tokens: int, model: str) -> str:
    """One whole (unstreamed) answer: the warm-up request, whose text is compared with the baseline's."""
    reply = requests.post(f"{url}/v1/chat/completions", json=chat_body(prompt, max_tokens, model, stream=False),
                          timeout=600)  # fmt: skip
    reply.raise_for_status()
    return reply.json()["choices"][0]["message"]["content"]


def load(
    url: str, concurrency: int, seconds: float, max_tokens: int, key: str | None = None, stop_at: float | None = None,
    models: list[str] | None = None,
) -> dict:  # fmt: skip
    """``concurrency`` closed-loop clients for ``seconds`` (or until ``stop_at``); only requests that finish in the
    window count. A request that gets no HTTP answer counts as an error with status 0. ``models``: the adapters
    each client alternates between, request by request (None: the server's default adapter)."""
    results: list[tuple[float, float, int, int]] = []
    stop_at = stop_at or time.perf_counter() + seconds
    lock = threading.Lock()
    names = models or [None]

    def client(offset: int) -> None:
        source = _cycle(prompts()[offset:] + prompts()[:offset])
        turn = offset  # clients start on different adapters, so both are in flight at once
        while time.perf_counter() < stop_at:
            try:
                outcome = stream_once(url, next(source), max_tokens, key=key, model=names[turn % len(names)])
            except requests.RequestException:
                outcome = (0.0, 0.0, 0, 0)
            turn += 1
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
        "concurrency": concurrency, "adapters": names, "requests": len(ok), "errors": len(results) - len(ok),
        "error_statuses": dict(Counter(r[3] for r in results if r[3] != 200)),
        "requests_per_s": len(ok) / elapsed, "tokens_per_s": sum(r[2] for r in ok) / elapsed,
        "latency_p50": _pct(latencies, 50), "latency_p95": _pct(latencies, 95), "latency_p99": _pct(latencies, 99),
        "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99),
    }  # fmt: skip


def deploy(registry: str, base: str, port: int, overrides: list[str]) -> str:
    """(Re)deploy the app as ``python -m serve`` does; its URL once it is healthy."""
    from serve.__main__ import run_serve, wait_healthy

    url, _ = run_serve(serve_config(registry, base, [f"serve.port={port}", *overrides]))
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
    load(url, 16, seconds, max_tokens, models=[ADAPTER])
    done.set()
    watcher.join()
    return timeline


def measure_serve(registry: str, base: str, args: argparse.Namespace) -> dict:
    """Ours: the load levels on one adapter, 16 clients alternating two, then autoscaling. Each adapter gets one
    untimed warm-up request (it loads on first use) before it is measured, as in the baseline."""
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = deploy(registry, base, port, ["serve.cpus_per_replica=2"])
    answers = {ADAPTER: answer(url, prompts()[0], args.max_tokens, ADAPTER)}
    levels = []
    for c in CONCURRENCY:
        levels.append(load(url, c, args.seconds, args.max_tokens, models=[ADAPTER]))
        print(f"serve: {json.dumps(levels[-1])}", flush=True)
    answers[SECOND] = answer(url, prompts()[0], args.max_tokens, SECOND)
    mixed = load(url, 16, args.seconds, args.max_tokens, models=[ADAPTER, SECOND])
    print(f"serve, two adapters: {json.dumps(mixed)}", flush=True)
    url = deploy(registry, base, port, [
        "serve.cpus_per_replica=1", "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=2",
        "serve.autoscaling.target_ongoing_requests=4", "serve.autoscaling.upscale_delay_s=3",
    ])  # fmt: skip
    answer(url, prompts()[0], args.max_tokens, ADAPTER)
    timeline = autoscaling(url, args.scale_seconds, args.max_tokens)
    serve.shutdown()
    ray.shutdown()
    return {"levels": levels, "mixed": mixed, "answers": answers, "timeline": timeline}


def _row(label: str, r: dict) -> str:
    if "ttft_p50" not in r:  # the baseline: no stream, no p95 worth the name at its request count
        return (f"| {label} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['latency_p50']:.2f} / - / "
                f"{r['latency_p99']:.2f} | - | 0 |")  # fmt: skip
    return (f"| {label} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['latency_p50']:.2f} / "
            f"{r['latency_p95']:.2f} / {r['latency_p99']:.2f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
            f"{r['errors']} |")  # fmt: skip


def _ratios(label: str, ours: dict, baseline: dict) -> str:
    speedup = ours["tokens_per_s"] / baseline["tokens_per_s"]
    latency = ours["latency_p99"] / baseline["latency_p50"]
    met = "met" if speedup >= 4 and latency < 3 else "not met"
    return (f"{label}: output tokens/s {speedup:.2f}x the baseline's (goal >= 4); p99 latency {latency:.2f}x the "
            f"baseline's single-request latency, its p50 (goal < 3): {met}")  # fmt: skip


def report(one: dict, two: dict, ours: dict) -> None:
    print("\n| concurrency | requests/s | output tokens/s | latency p50 / p95 / p99 (s) | TTFT p50 / p99 (s) | "
          "errors |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    print(_row("baseline (1 at a time, `model.generate`, adapter merged)", one))
    print(_row("baseline, two adapters alternating (one merged model each)", two))
    for r in ours["levels"]:
        print(_row(str(r["concurrency"]), r))
    print(_row("16, two adapters alternating", ours["mixed"]))
    at16 = next(r for r in ours["levels"] if r["concurrency"] == 16)
    print("\n" + _ratios("at 16", at16, one))
    print(_ratios("at 16, two adapters alternating", ours["mixed"], two))
    for name, text in ours["answers"].items():  # same prompt building and decoding: the same greedy answer
        same = "the same" if text == two["answers"][name] else "DIFFERENT"
        print(f"warm-up answer of {name}: ours and the baseline's are {same}: {text!r}")
    print("replicas over time (s: running):", ", ".join(f"{t}: {n}" for t, n in ours["timeline"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", help="adapter directory (default: the quickstart's)")
    parser.add_argument("--seconds", type=float, default=30, help="duration of each load level and baseline run")
    parser.add_argument("--scale-seconds", type=float, default=60, help="duration of the autoscaling run")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    adapter = Path(args.adapter or quickstart_adapter())
    if not (adapter / "adapter_model.safetensors").exists():
        print(f"error: no adapter at {adapter}: run `make quickstart` first, or pass --adapter DIR", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory() as home:
        second = half_adapter(adapter, Path(home))
        registry, base = registry_with(adapter, Path(home), {SECOND: second})
        baseline = Baseline(serve_config(registry, base, ["serve.cpus_per_replica=2"]), {ADAPTER: adapter,
                                                                                         SECOND: second})  # fmt: skip
        one = run_baseline(baseline, [ADAPTER], args.seconds, args.max_tokens)
        print(f"baseline: {json.dumps(one)}", flush=True)
        two = run_baseline(baseline, [ADAPTER, SECOND], args.seconds, args.max_tokens)
        print(f"baseline, two adapters: {json.dumps(two)}", flush=True)
        del baseline  # its models' memory back before the app loads its own
        ours = measure_serve(registry, base, args)
    report(one, two, ours)
    return 0


if __name__ == "__main__":
    sys.exit(main())
