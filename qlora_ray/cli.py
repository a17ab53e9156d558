"""The command line every entry point shares: one parser shape, one console set-up, one error path.

Each command (``qlora-ray train ...`` or its ``python -m jobs.train ...`` form) takes ``--config PATH`` plus
dotted ``key=value`` overrides and ``-v``/``--verbose``. A mistake the user can fix (a
:class:`~qlora_ray.errors.QloraRayError`, or a command line argparse cannot read) prints ``error: ...`` with
the fix and exits 1, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from qlora_ray import console
from qlora_ray.config import Config, load_config
from qlora_ray.errors import QloraRayError
from qlora_ray.runtime import remote_message

log = logging.getLogger(__name__)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error path: ``error: ...`` and exit status 1."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(1)


def parser(prog: str, description: str, *, config: bool = True, example: str = "train.lr=1e-4") -> Parser:
    """A command's parser: ``--config PATH``, dotted overrides and ``-v`` (``config=False``: ``-v`` alone)."""
    command = Parser(prog=prog, description=description)
    if config:
        command.add_argument("--config", required=True, help="YAML config file")
        command.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    add_verbose(command)
    return command


def add_verbose(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "-v", "--verbose", action="store_true", help="show every log line (Ray's and the libraries') on the console"
    )


def run(args: argparse.Namespace, body: Callable[[], int | None]) -> int:
    """Set up the console, run ``body``, and turn a user's mistake into ``error: ...`` and exit status 1."""
    console.setup(getattr(args, "verbose", False))
    try:
        return body() or 0
    except QloraRayError as err:
        # Raised in a Ray worker, it arrives wrapped, its text the remote traceback: keep the message.
        log.error("error: %s", remote_message(err) if "Traceback (most recent call last)" in str(err) else err)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    finally:
        console.teardown()


def load(args: argparse.Namespace, command: str) -> Config:
    """The command's config (``--config`` plus overrides); from here on the run's log file records everything."""
    cfg = load_config(args.config, args.overrides)
    wanted = console.log_path(command, cfg.run.name)
    try:
        path = console.open_log(wanted)
    except OSError as err:  # a read-only working directory: run on, with the console and Ray's logs only
        log.warning("no log file: cannot write %s (%s); set %s to a writable directory", wanted, err.strerror,
                    console.LOG_DIR_ENV)  # fmt: skip
        return cfg
    log.info("log: %s (everything%s)", path, "" if getattr(args, "verbose", False) else "; -v shows it all here")
    return cfg


def description(doc: str | None) -> str:
    """A module docstring's first line, for ``--help``."""
    return (doc or "").strip().split("\n")[0]
