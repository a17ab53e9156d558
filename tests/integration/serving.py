"""A real Serve app for tests: local Ray, Serve's proxy on 127.0.0.1, a registry of test adapters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapters import register_adapter
from processes import free_port

KEY = "test-key-123"
PROMPT = "GALAXY < what is ?"


def post(url: str, path: str, body: dict, key: str | None = KEY, **kwargs: Any) -> Any:
    """POST ``body`` as JSON, with ``key`` as the bearer key (None: no Authorization header)."""
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}{path}", json=body, headers=headers, timeout=60, **kwargs)


def events(response: Any) -> list:
    """A streamed response's chunk objects; it must end with ``data: [DONE]``."""
    import json

    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@contextlib.contextmanager
def serve_cluster(home: Path, base: Path) -> Iterator[dict[str, Any]]:
    """Ray and Serve running, with adapters faq-a (the best) and faq-b in ``home/registry`` and a keys file."""
    import ray
    from ray import serve

    registry = home / "registry"
    register_adapter(registry, "faq-a", base, seed=1, val_loss=1.0, staging=home / "staging")
    register_adapter(registry, "faq-b", base, seed=2, val_loss=2.0, staging=home / "staging")
    (home / "keys.txt").write_text(f"# one key per line\n{KEY}\n")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield {"home": home, "registry": registry, "base": base, "port": port}
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(cluster: dict[str, Any], *overrides: str) -> str:
    """(Re)deploy the app as ``python -m serve`` does, with the test settings plus ``overrides``; its URL once
    it is healthy."""
    from qlora_ray.config import load_config
    from serve.__main__ import run_serve, wait_healthy

    cfg = load_config(None, [
        f"model.name_or_path={cluster['base']}", "data.path=unused.jsonl", f"run.registry={cluster['registry']}",
        "serve.host=127.0.0.1", f"serve.port={cluster['port']}", "serve.max_prompt_tokens=32",
        "serve.max_new_tokens=600", "serve.default_max_tokens=8", *overrides,
    ])  # fmt: skip
    url, _ = run_serve(cfg)
    assert wait_healthy(url, 120), f"the app at {url} did not become healthy in 120 s"
    return url
