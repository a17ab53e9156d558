"""A real Serve app for tests: local Ray, Serve's proxy on 127.0.0.1, a registry of test adapters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from adapters import register_adapter
from processes import free_port, wait_for

KEY = "test-key-123"


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
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield {"home": home, "registry": registry, "base": base, "url": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(cluster: dict[str, Any], *overrides: str) -> str:
    """(Re)deploy the app with the test settings plus ``overrides``; its URL once it is healthy."""
    from ray import serve

    from jobs.config import load_config
    from serve.app import bind

    cfg = load_config(None, [
        f"model.name_or_path={cluster['base']}", "data.path=unused.jsonl", f"run.registry={cluster['registry']}",
        "serve.max_prompt_tokens=32", "serve.max_new_tokens=600", "serve.default_max_tokens=8", *overrides,
    ])  # fmt: skip
    serve.run(bind(cfg), name="qlora-ray", route_prefix="/", blocking=False)
    url = cluster["url"]
    wait_for(lambda: requests.get(f"{url}/healthz", timeout=10).status_code == 200, 120, "the app to be healthy")
    return url
