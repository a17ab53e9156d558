"""Deploy the Serve app from a run config: ``python -m serve --config PATH [overrides]``.

On a running cluster (``RAY_ADDRESS``, or under ``ray job submit``) the app is deployed and stays up after this
command ends. Without one, a local Ray is started and the app serves until Ctrl-C.
"""

from __future__ import annotations

import logging
import sys
import time

from jobs.artifacts import RegistryError
from jobs.config import Config, ConfigError, config_from_cli
from jobs.train import TrainError, start_ray

APP_NAME = "qlora-ray"


def run_serve(cfg: Config, blocking: bool | None = None) -> str:
    """Start Serve on ``serve.host``:``serve.port``, deploy the app, wait until it answers; return its URL."""
    from ray import serve

    from serve.app import bind

    ray = start_ray(dashboard=True)
    # A Ray that this process started (not one it connected to) ends with it: keep serving here then.
    started_here = getattr(ray._private.worker._global_node, "head", False)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(bind(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    print(f"serving on {url}/v1 (OpenAI-compatible); health: {url}/healthz", flush=True)
    if started_here if blocking is None else blocking:
        print("local Ray: serving until Ctrl-C", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = config_from_cli("python -m serve", __doc__.split("\n")[0], argv, "serve.port=8001")
        run_serve(cfg)
    except (ConfigError, TrainError, RegistryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
