"""Deploy the Serve app from a run config: ``python -m serve --config PATH [overrides]``.

On a running cluster (``RAY_ADDRESS``, or under ``ray job submit``) the app is deployed and stays up after this
command ends. Without one, a local Ray is started and the app serves until Ctrl-C.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request

from qlora_ray import cli, console
from qlora_ray.config import Config
from qlora_ray.runtime import start_ray, started_here

APP_NAME = "qlora-ray"


def run_serve(cfg: Config) -> tuple[str, bool]:
    """Start Serve on ``serve.host``:``serve.port`` and deploy the app; its URL, and whether Ray is local.

    A local Ray (one this process started, not one it connected to) ends with this process: its caller
    keeps serving with :func:`serve_until_interrupted`. On a cluster the app stays up after the caller ends.
    """
    from ray import serve

    from serve.app import bind

    start_ray()
    console.restore()  # Serve's driver-side logger, set up when ray.serve was imported, through ours
    local = started_here()
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


def main(argv: list[str] | None = None, prog: str = "python -m serve") -> int:
    args = cli.parser(prog, cli.description(__doc__), example="serve.port=8001").parse_args(argv)
    return cli.run(args, lambda: _serve(cli.load(args, "serve")))


def _serve(cfg: Config) -> None:
    _url, local = run_serve(cfg)
    if local:
        serve_until_interrupted()


if __name__ == "__main__":
    sys.exit(main())
