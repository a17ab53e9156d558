"""Ray start-up and the run's storage: how every job reaches its cluster.

With ``RAY_ADDRESS`` set, or inside ``ray job submit``, a job connects to that cluster; otherwise it starts
a local Ray on this machine. Either way the same code runs. Errors raised inside Ray workers reach the
driver as text with the remote traceback; :func:`remote_message` and :func:`failure_summary` cut them down
to the message a user needs.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from qlora_ray import console
from qlora_ray.config import Config
from qlora_ray.errors import QloraRayError
from qlora_ray.storage import is_uri

log = logging.getLogger(__name__)


class ClusterError(QloraRayError, RuntimeError):
    """A cluster that cannot be reached or used as configured; the message says what to check."""


def start_ray() -> Any:
    """Connect to the cluster (``RAY_ADDRESS``, or the job's under ``ray job submit``) or start a local Ray.

    A local Ray always gets its dashboard: it serves the State API, through which Ray Train's placement-group
    cleaner checks that a run's controller is alive. Without it that check fails, and after a few minutes the
    cleaner may take a run for dead and remove its workers (seen on a 124-step run); a sweep also needs it to
    release the resources of the trials ASHA stops.
    """
    import ray

    if ray.is_initialized():
        return ray
    try:
        with console.hush("Ray start-up"):
            context = _init(ray)
    except (ConnectionError, ray.exceptions.AuthenticationError) as err:
        reason = remote_message(err) + (f": {err.__cause__}" if err.__cause__ else "")
        raise ClusterError(
            f"cannot reach the Ray cluster ({reason}). Check that it runs (ray status) and that "
            "RAY_ADDRESS is right; clusters started with `ray start` need RAY_AUTH_MODE=token on Ray >= 2.60"
        ) from None
    console.restore()
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)
    return ray


def _init(ray: Any) -> Any:
    """``ray.init`` with the console's options and environment for every process of the job.

    Under ``ray job submit`` Ray merges that environment with the job's; if the submitter set one of the same
    variables, Ray refuses the merge, and the job's own settings are kept.
    """
    options = {**console.ray_init_options(), "include_dashboard": True}
    try:
        return ray.init(**options, runtime_env={"env_vars": console.ray_environment()})
    except ValueError as err:
        if "Failed to merge the Job's runtime env" not in str(err):
            raise
        log.warning("the job's runtime environment sets the console's variables; keeping the job's")
        return ray.init(**options)


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local Ray that ends with it).

    Ray has no public API for this; its node object knows whether it is the head this process started.
    This is the project's one use of ``ray._private`` in code (``qlora_ray/ray_data_logging.yaml`` names Ray's
    own log handler classes, as Ray Data's documentation does for its logging config).
    """
    import ray

    return bool(getattr(ray._private.worker._global_node, "head", False))


def storage_path(cfg: Config, ray: Any) -> str:
    """``run.storage_path``, refused when it is a local path on a cluster of several nodes."""
    storage = cfg.run.storage_path
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if not is_uri(storage) and len(alive) > 1:
        raise ClusterError(
            f"run.storage_path {storage!r} is a local path, but this cluster has {len(alive)} nodes: workers on "
            "other nodes could not write checkpoints there. Use shared storage: s3://..., gs://..., or an NFS "
            "mount given as a path that every node sees (then set it as file:///mnt/...)"
        )
    return storage


def failure_summary(err: BaseException) -> str:
    """One line per failed Ray Train worker (its exception's message, not its traceback), or the error's message."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        return "; ".join(f"rank {rank}: {remote_message(error)}" for rank, error in sorted(failures.items()))
    return remote_message(err)


def remote_message(err: BaseException) -> str:
    """The message of an error that may carry a remote traceback in its text.

    Errors raised in a Ray worker carry the remote traceback in their text; the last line is the message,
    after the exception's qualified name ("jobs.loop.DivergedError: ...").
    """
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return re.sub(r"^[A-Za-z_][\w.]*(Error|Exception): ", "", lines[-1].strip())
