"""Running our CLIs as real subprocesses, each with its own local Ray, and killing them mid-run."""

import os
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Ray Train's controller collects reports when it polls the workers (every 2 s by default), and a worker
# blocks on its next report until then. The tiny test model reports far more often than real runs, so
# poll faster; a checkpoint a worker wrote within one poll of dying is not yet registered either way.
ENV = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def start(command, log, env=None):
    # A process group of its own, so that killing it takes its local Ray down with it.
    return subprocess.Popen(
        command, cwd=REPO, env=env or ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
