"""Deploy the Serve app from a run config: ``python -m serve --config PATH [overrides]``.

On a running cluster (``RAY_ADDRESS``, or under ``ray job submit``) the app is deployed and stays up after this
command ends. Without one, a local Ray is started and the app serves until Ctrl-C.
"""

from __future__ import annotations

import logging
import sys
import time
import urllib.error
import urllib.request

from jobs.artifacts import RegistryError
from jobs.config import Config, ConfigError, config_from_cli
from jobs.train import TrainError, start_ray

APP_NAME = "qlora-ray"


def run_serve(cfg: Config) -> tuple[str, bool]:
    """Start Serve on ``serve.host``:``serve.port`` and deploy the app; its URL, and whether Ray is local.

    A local Ray (one this process started, not one it connected to) ends with this process: its caller
    keeps serving with :func:`serve_until_interrupted`. On a cluster the app stays up after the caller ends.
    """
    from ray import serve

    from serve.app import bind

    ray = start_ray()
    local = bool(getattr(ray._private.worker._global_node, "head", False))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(bind(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    print(f"serving on {url}/v1 (OpenAI-compatible); health: {url}/healthz", flush=True)
    return url, local


def wait_healthy(url: str, timeout_s: float = 300) -> bool:
    """Poll ``url``/healthz until it answers 200 (a generator replica has its model loaded); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):  # not listening yet, or 503 while the replica loads
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def serve_until_interrupted() -> None:
    """Keep this process, and with it a local Ray and its Serve app, alive until Ctrl-C."""
    from ray import serve

    print("local Ray: serving until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = config_from_cli("python -m serve", __doc__.split("\n")[0], argv, "serve.port=8001")
        _url, local = run_serve(cfg)
        if local:
            serve_until_interrupted()
    except (ConfigError, TrainError, RegistryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
