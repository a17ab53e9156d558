"""What a person sees on the console, and where everything else goes.

By default the console tells the project's story: the log lines of our own packages (stages, progress with
ETA, warnings that need the user, summaries) and every error from any process. Everything else (Ray's and the
libraries' info lines, deprecation warnings, progress bars) goes to the run's log file and to Ray's own logs.
``--verbose`` (``-v``) puts everything back on the console.

The choice travels to Ray workers in the ``QLORA_RAY_VERBOSE`` environment variable: a local Ray inherits the
driver's environment, and Train workers get it in their runtime environment. Every process we start code in
calls one set-up first: :func:`setup` (a command's driver), :func:`setup_worker` (a Train worker, an evaluation
actor) or :func:`setup_replica` (a Serve replica).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROJECT_LOGGERS = frozenset({"data", "jobs", "tune", "serve", "qlora_ray", "bench", "__main__"})
VERBOSE_ENV = "QLORA_RAY_VERBOSE"
LOG_DIR_ENV = "QLORA_RAY_LOG_DIR"
# Libraries' own switches for their progress bars and info lines, read when they are imported or started. A
# local Ray's processes inherit them from the driver; their lines stay in Ray's own log files.
_QUIET_LIBRARIES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's old reporter, which prints nothing at verbose=0
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
    "RAY_SERVE_LOG_TO_STDERR": "0",  # Serve's lines (access log included) go to its files under logs/serve/
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}
_FORMAT_FILE = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_handlers: list[logging.Handler] = []
_saved: dict[str, Any] = {}  # what setup() changed, for teardown()
log = logging.getLogger(__name__)


# Libraries whose warnings are about the user's run (Tune: a trial that cannot be scheduled), not their routine.
WARNING_LOGGERS = ("ray.tune", "ray.train")


class _Story(logging.Filter):
    """Our own lines from INFO up, Ray Tune's and Ray Train's warnings, and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno >= logging.WARNING and record.name.startswith(WARNING_LOGGERS):
            return True
        return record.levelno >= logging.INFO and record.name.split(".", 1)[0] in PROJECT_LOGGERS


class Progress:
    """The one progress display of a long task: a line when it starts, then every ``every_s`` seconds, with ETA."""

    def __init__(self, what: str, total: int, every_s: float = 15.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self.start = self.last = time.monotonic()
        log.info("%s: %d to go", what, total)

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(self.done, 1) * max(self.total - self.done, 0)
        log.info("%s: %d/%d, %s elapsed, eta %s", self.what, self.done, self.total, clock(elapsed), clock(eta))


def clock(seconds: float) -> str:
    """``1m05s`` (or ``12s``)."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def verbose() -> bool:
    """Whether this process shows everything: ``--verbose``, ``QLORA_RAY_VERBOSE=1`` from its driver, or no
    ``QLORA_RAY_VERBOSE`` at all (code not started by our command line: its logging is left as it was)."""
    return os.environ.get(VERBOSE_ENV, "1") == "1"


def setup(verbose: bool = False) -> None:
    """Configure the driver's console; call once at the start of a command, before Ray or models load.

    ``verbose``: ``-v`` was given (``QLORA_RAY_VERBOSE=1`` in the environment has the same effect).
    :func:`teardown` undoes all of it when the command ends.
    """
    root = logging.getLogger()
    _saved.clear()
    _saved.update(
        handlers=list(root.handlers), level=root.level,
        environ={name: os.environ.get(name) for name in (VERBOSE_ENV, *_QUIET_LIBRARIES)},
    )  # fmt: skip
    verbose = verbose or os.environ.get(VERBOSE_ENV) == "1"
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    quiet_libraries()
    logging.captureWarnings(True)
    _install(_console_handler(verbose))


def teardown() -> None:
    """Undo :func:`setup` (at the end of a command): the log file closed, handlers, level and environment back."""
    close_log()
    if not _saved:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in _saved["handlers"]:
        root.addHandler(handler)
    root.setLevel(_saved["level"])
    for name, value in _saved["environ"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    logging.captureWarnings(False)
    _handlers.clear()
    _saved.clear()


def ray_environment() -> dict[str, str]:
    """The console choice and the quiet libraries' switches, for every process of the job (``ray.init``'s
    runtime environment): on a cluster, Ray's processes do not inherit the driver's environment.

    Not Ray Data's logging config: it is a path on this machine, which other nodes may not have (and Ray Data
    cannot start without the file it names). A local Ray inherits it with the rest of the driver's environment.
    """
    names = (VERBOSE_ENV, *([] if verbose() else _QUIET_LIBRARIES))
    return {name: os.environ[name] for name in names if name in os.environ and name != "RAY_DATA_LOGGING_CONFIG"}


def setup_worker(rank: int = 0) -> None:
    """Configure a Ray worker process the same way: rank 0 (or a lone actor) tells the story, others only warn.

    Ray Train gives its workers' root logger a console handler and a file handler of its own: they are kept
    (the file is Ray's own log), and the console one gets the same filter as the driver's.
    """
    quiet_libraries()
    if not verbose():
        logging.getLogger("ray").setLevel(logging.WARNING)
    _filter_consoles(rank)


def _filter_consoles(rank: int) -> None:
    """The root logger's console handlers (Ray's or a new one) with the story filter, at INFO on rank 0."""
    quiet = not verbose()
    logging.captureWarnings(True)
    root = logging.getLogger()
    consoles = [
        h for h in root.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    if not consoles:
        consoles = [logging.StreamHandler(sys.stderr)]
        consoles[0].setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(consoles[0])
    for handler in consoles:
        if quiet and not any(isinstance(f, _Story) for f in handler.filters):
            handler.addFilter(_Story())
        handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.setLevel(logging.INFO)


def quiet_libraries() -> None:
    """Unless verbose: no progress bars, Ray's and transformers' info lines off the console (a Serve replica, whose
    logging Serve itself configures, calls only this)."""
    if verbose():
        return
    for name, value in _QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    _quiet_transformers()


def setup_replica() -> None:
    """A Serve replica: quiet libraries, the root logger's console filtered as in the driver, and Serve's
    errors on stderr even when Serve's own console logging is off (``RAY_SERVE_LOG_TO_STDERR=0``, quiet mode),
    so that they reach the driver's console. Serve's ``ray.serve`` logger keeps the level Serve gave it."""
    if verbose():
        return
    serve_prints = os.environ.get("RAY_SERVE_LOG_TO_STDERR") != "0"  # as Serve read it at import
    quiet_libraries()
    _filter_consoles(rank=0)
    if serve_prints:
        return
    serve_logger = logging.getLogger("ray.serve")
    if not any(getattr(h, "name", "") == "qlora-ray-errors" for h in serve_logger.handlers):
        errors = logging.StreamHandler(sys.stderr)
        errors.set_name("qlora-ray-errors")
        errors.setLevel(logging.ERROR)
        errors.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        serve_logger.addHandler(errors)


def open_log(path: str | Path) -> Path:
    """Also write every record (ours and the libraries', INFO and up) to ``path``; returns it, absolute."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)  # libraries whose loggers run at DEBUG (Ray Data's) keep that in their own files
    handler.setFormatter(logging.Formatter(_FORMAT_FILE))
    logging.getLogger().addHandler(handler)
    _handlers.append(handler)
    return path


def close_log() -> None:
    """Stop writing to the log file :func:`open_log` opened (at the end of a command)."""
    root = logging.getLogger()
    for handler in [h for h in _handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
        _handlers.remove(handler)


def log_path(command: str, run_name: str) -> Path:
    """Where a command's log goes: ``$QLORA_RAY_LOG_DIR`` (default ``logs/``) / ``<run.name>.<command>.log``."""
    return Path(os.environ.get(LOG_DIR_ENV, "logs")) / f"{run_name}.{command}.log"


def ray_init_options() -> dict[str, Any]:
    """Keyword arguments for ``ray.init``: the root and Ray loggers of every process of the job at ERROR unless
    verbose.

    ``ray.init`` also configures this (the driver's) root logger; :func:`restore` puts ours back afterwards.
    """
    import ray

    if verbose():
        return {"log_to_driver": True}
    # ERROR, not WARNING: Ray's own actors warn about their routine (a placement group cleaned up after a
    # trial); our processes' warnings still show, as setup_worker gives them their own level.
    return {"log_to_driver": True, "logging_config": ray.LoggingConfig(log_level="ERROR")}


def train_logging() -> Any:
    """Ray Train's own logging config: its info lines (worker-group start-up, reports, checkpoints) off the
    console unless verbose; Ray Train's log files keep everything."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def restore() -> None:
    """Put our handlers back as the root logger's only ones (after ``ray.init`` added its own).

    Does nothing in a process whose console is not ours (:func:`setup` never ran, e.g. under pytest).
    """
    if not _handlers:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler not in _handlers:
            root.removeHandler(handler)
    for handler in _handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(logging.INFO)
    for library in ("ray", "ray.data", "ray.serve"):  # Ray Data and Serve configure theirs apart from Ray's
        if library == "ray" or library in sys.modules:
            _adopt(library)
    logging.getLogger("ray").setLevel(logging.INFO)  # ray.init set the driver's to the job's level: the file wants INFO
    if not verbose():
        _quiet_transformers()


def _adopt(name: str) -> None:
    """Route a library logger that prints on its own through ours: its lines reach the log file, and the
    console only as the filter allows."""
    library = logging.getLogger(name)
    for handler in list(library.handlers):
        library.removeHandler(handler)
    library.propagate = True


@contextlib.contextmanager
def hush(what: str) -> Iterator[None]:
    """Unless verbose, send what a library prints to stdout and stderr while it does ``what`` to the log file.

    For libraries that print instead of logging (a conversion's progress bar, Ray's start-up banner). Errors
    still raise; the text is logged at INFO under ``captured`` (the log file; not the console).
    """
    if verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:  # a traceback or an error among it still reaches the console
            alarming = "Traceback" in text or "Error" in text
            logging.getLogger("captured").log(logging.ERROR if alarming else logging.INFO, "%s:\n%s", what, text)


def _console_handler(verbose: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not verbose:
        handler.addFilter(_Story())
    return handler


def _install(console: logging.Handler) -> None:
    """``console`` as the root logger's console handler, replacing any earlier one (files are kept)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    _handlers[:] = [h for h in _handlers if isinstance(h, logging.FileHandler)] + [console]
    root.addHandler(console)
    root.setLevel(logging.INFO)
    if not verbose():
        _quiet_transformers()


def _quiet_transformers() -> None:
    """transformers writes to a handler of its own and draws progress bars when it loads weights: send its
    lines through ours (the log file; the console filters them) and turn the bars off. Imported later, it reads
    ``TRANSFORMERS_VERBOSITY`` (warnings off) until this runs again (:func:`restore`, after Ray starts)."""
    if "transformers" not in sys.modules:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
