"""Serve under abuse: 16 streaming clients alone, then the same 16 while other clients send bad requests of
every kind (no key, malformed JSON, a lone surrogate, an empty prompt, refused fields, over-long prompts, too
many messages, 40 MB bodies, uploads trickled a byte at a time, unknown adapters).

    .venv/bin/python bench/serve_abuse.py [--adapter DIR] [--seconds 60]

Model: the quickstart's starter model with the quickstart adapter when ``make quickstart`` has written it,
else a LoRA adapter with random weights on the same model (answer quality plays no part here). One generator
replica with every core, API keys on, the default limits.

Reported for both phases: good requests finished and failed, output tokens/s, latency p50 / p99; and for the
abusive phase each kind of bad request with the statuses it got. Goal: zero good requests failed, and each
bad request answered with its 4xx.
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
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve_load import deploy, free_port, load, prompts, quickstart_adapter, registry_with, stream_once  # noqa: E402

KEY = "bench-key"
CLIENTS = 16
ABUSERS = 4


def random_adapter(home: Path) -> Path:
    """A LoRA adapter with small random weights on the quickstart's model, saved as the trainer saves one."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model

    from qlora_ray.config import load_config
    from qlora_ray.generate import load_inference_model

    cfg = load_config(REPO / "configs/quickstart.yaml")
    torch.manual_seed(0)
    model = load_inference_model(cfg.model)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(cfg.lora.target_modules), init_lora_weights=False)
    peft = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.01)
    directory = home / "adapter"
    peft.save_pretrained(directory, safe_serialization=True)
    (directory / "qlora_ray_config.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    (directory / "metrics.json").write_text(json.dumps({"val_loss": 1.0}))  # so the registry ranks it best
    return directory


def _raw(port: int, head: bytes, body: bytes, trickle_s: float = 0.0) -> int:
    """A request over a plain socket, its body sent whole, or a byte every ``trickle_s``; the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(head)
        try:
            if trickle_s:
                for byte in body:
                    conn.sendall(bytes([byte]))
                    conn.settimeout(trickle_s)
                    try:
                        if conn.recv(1, socket.MSG_PEEK):
                            break  # answered (408) before the body was done
                    except TimeoutError:
                        pass
                conn.settimeout(60)
            else:
                for at in range(0, len(body), 1 << 16):
                    conn.sendall(body[at : at + (1 << 16)])
        except OSError:
            pass  # answered and closed before the rest: the point of the limit
        reply = conn.recv(64)
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


def bad_requests(url: str, port: int) -> list[tuple[str, Any]]:
    """One callable per kind of bad request, each returning the HTTP status it got."""
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = f"{url}/v1/chat/completions"

    def post(body: dict, headers: dict | None = None) -> int:
        return requests.post(chat, json=body, headers=auth if headers is None else headers, timeout=120).status_code

    def raw_json(data: bytes) -> int:
        headers = {**auth, "Content-Type": "application/json"}
        return requests.post(chat, data=data, headers=headers, timeout=120).status_code

    user = [{"role": "user", "content": "What is Ray?"}]
    chunk = b"x" * (1 << 20)
    forty_mb = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(40)) + b"0\r\n\r\n"
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\n").encode()  # fmt: skip
    slow_body = json.dumps({"messages": user}).encode()
    return [
        ("no key", lambda: post({"messages": user}, headers={})),
        ("wrong key", lambda: post({"messages": user}, headers={"Authorization": "Bearer nope"})),
        ("malformed JSON", lambda: raw_json(b'{"messages": [')),
        ("lone surrogate", lambda: raw_json(b'{"messages": [{"role": "user", "content": "\\ud800"}]}')),
        ("empty prompt", lambda: post({"messages": [{"role": "user", "content": ""}]})),
        ("refused field", lambda: post({"messages": user, "logprobs": True})),
        ("image part", lambda: post({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
        ("prompt over max_prompt_tokens", lambda: post({"messages": [{"role": "user", "content": "Ray " * 3000}]})),
        ("too many messages", lambda: post({"messages": user * 200})),
        ("unknown adapter", lambda: post({"messages": user, "model": "no-such-adapter"})),
        ("40 MB chunked body", lambda: _raw(port, head + b"Transfer-Encoding: chunked\r\n\r\n", forty_mb)),
        ("upload trickled", lambda: _raw(port, head + b"Content-Length: %d\r\n\r\n" % len(slow_body), slow_body, 0.5)),
    ]


def abusive_phase(url: str, port: int, seconds: float, max_tokens: int) -> tuple[dict, dict[str, Counter]]:
    stop_at = time.perf_counter() + seconds
    kinds = bad_requests(url, port)
    answers: dict[str, Counter] = {name: Counter() for name, _ in kinds}
    lock = threading.Lock()

    def abuser(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            name, send = kinds[i % len(kinds)]
            try:
                status = send()
            except requests.RequestException as err:
                status = type(err).__name__
            with lock:
                answers[name][status] += 1
            i += 1

    threads = [threading.Thread(target=abuser, args=(i * 3,)) for i in range(ABUSERS)]
    for t in threads:
        t.start()
    good = load(url, CLIENTS, seconds, max_tokens, key=KEY, stop_at=stop_at)
    for t in threads:
        t.join()
    return good, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", help="adapter directory (default: the quickstart's)")
    parser.add_argument("--seconds", type=float, default=60, help="duration of each phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory() as home:
        adapter = Path(args.adapter or quickstart_adapter())
        if not (adapter / "adapter_model.safetensors").exists():
            print(f"no adapter at {adapter}: a random LoRA adapter on the quickstart's model stands in", flush=True)
            adapter = random_adapter(Path(home))
        registry, base = registry_with(adapter, Path(home))
        (Path(home) / "keys.txt").write_text(KEY + "\n")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        url = deploy(registry, base, port, ["serve.cpus_per_replica=2", f"serve.api_keys_file={home}/keys.txt"])
        stream_once(url, prompts()[0], args.max_tokens, key=KEY)  # warm-up: the adapter loads on first use
        calm = load(url, CLIENTS, args.seconds, args.max_tokens, key=KEY)
        print(f"calm: {json.dumps(calm)}", flush=True)
        abused, answers = abusive_phase(url, port, args.seconds, args.max_tokens)
        print(f"abused: {json.dumps(abused)}", flush=True)
        healthy = requests.get(f"{url}/healthz", timeout=10).status_code
        serve.shutdown()
        ray.shutdown()

    print(f"\n| phase ({CLIENTS} streaming clients) | good requests | good failed | output tokens/s | "
          "latency p50 / p99 (s) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for name, r in (("alone", calm), (f"with {ABUSERS} clients sending bad requests", abused)):
        print(f"| {name} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.1f} | "
              f"{r['latency_p50']:.2f} / {r['latency_p99']:.2f} |")  # fmt: skip
    print("\n| bad request | sent | answered |\n| --- | --- | --- |")
    for name, statuses in answers.items():
        got = ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items(), key=str))
        print(f"| {name} | {sum(statuses.values())} | {got} |")
    print(f"\n/healthz after: {healthy}; good requests failed under abuse: {abused['errors']} (goal 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
