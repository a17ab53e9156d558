"""Where runs, reports and registries live: a local path or a URI, read and written one way.

A location is a local path (``runs``, ``/mnt/shared/runs``) or a pyarrow filesystem URI (``file:///...``,
``s3://bucket/runs``, ``gs://...``, or any store fsspec has a driver for that pyarrow lacks, e.g. ``memory://``).
Every module that reads or writes one goes through :func:`filesystem_of`, so a local directory and an object
store behave the same. Text files are written beside their target and moved into place, so a reader never sees
half a file, and a writer killed half-way leaves the old file whole; the next write of that file removes what it
left behind.
"""

from __future__ import annotations

import calendar
import posixpath
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs

from qlora_ray.errors import QloraRayError

# A staging file or directory older than this, with no lock to tell, is a killed writer's: a live one's is younger.
STALE_AFTER_S = 3600.0
_STAMP = re.compile(r"(\d{8}T\d{6})Z-[0-9a-f]{8}$")


class StorageError(QloraRayError, ValueError):
    """A location that cannot be opened; the message names it and what to give instead."""


def fresh_name(prefix: str) -> str:
    """``<prefix><UTC time>Z-<8 hex>``: unique, and :func:`is_stale` can tell its age from it."""
    return f"{prefix}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}Z-{uuid.uuid4().hex[:8]}"


def age_of(name: str) -> float | None:
    """Seconds since :func:`fresh_name` made ``name``; None for a name it did not make."""
    stamp = _STAMP.search(name)
    return None if stamp is None else time.time() - calendar.timegm(time.strptime(stamp.group(1), "%Y%m%dT%H%M%S"))


def is_stale(name: str) -> bool:
    """Whether :func:`fresh_name` made ``name`` more than :data:`STALE_AFTER_S` ago."""
    age = age_of(name)
    return age is not None and age > STALE_AFTER_S


def is_uri(location: str) -> bool:
    return "://" in location


def filesystem_of(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem of a local path or a URI, and the path inside it (no trailing slash)."""
    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
    except (ValueError, OSError, NotImplementedError) as err:
        try:  # a store pyarrow has no driver for may have an fsspec one (memory://, az:// with adlfs, ...)
            from fsspec.core import url_to_fs

            store, path = url_to_fs(location)
        except (ImportError, ValueError, OSError):
            raise StorageError(
                f"cannot open {location!r}: {err}. Give a local path or a URI pyarrow supports (file://, s3://, gs://)"
            ) from None
        filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store))
    return filesystem, path.rstrip("/") or "/"


def read_text(location: str) -> str | None:
    """The text of the file at ``location``, or None when there is none."""
    filesystem, path = filesystem_of(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        return None


def write_text(location: str, text: str) -> None:
    """Write ``text`` to ``location`` whole (see :func:`write_bytes_atomic`); one process writes ``location``
    (a run's driver), so any staging file of it that is lying around is a killed writer's and is removed."""
    filesystem, path = filesystem_of(location)
    write_bytes_atomic(filesystem, path, text.encode(), sole_writer=True)


def write_bytes_atomic(filesystem: Any, path: str, data: bytes, *, sole_writer: bool = False) -> None:
    """``data`` to ``path`` on ``filesystem`` through a sibling staging file and a move.

    A move of one file is atomic on a local filesystem (a rename) and on an object store (the new object appears
    whole), so ``path`` always holds the old bytes or the new ones. What killed writers left is removed first
    (see :func:`remove_leftovers`).
    """
    parent, name = posixpath.split(path)
    filesystem.create_dir(parent, recursive=True)
    remove_leftovers(filesystem, path, sole_writer=sole_writer)
    staging = f"{parent}/{fresh_name(f'.{name}.')}"
    with filesystem.open_output_stream(staging) as out:
        out.write(data)
    filesystem.move(staging, path)


def remove_leftovers(filesystem: Any, path: str, *, sole_writer: bool) -> None:
    """Delete the staging files of ``path`` (``.<name>.<fresh_name stamp>``) that killed writers left: all of
    them when the caller is the only writer (``sole_writer``: it holds a lock, or nothing else writes ``path``),
    else those older than :data:`STALE_AFTER_S` (never a live writer's)."""
    parent, name = posixpath.split(path)
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True)):
        staged = info.base_name.startswith(f".{name}.") and age_of(info.base_name) is not None
        if staged and (sole_writer or is_stale(info.base_name)):
            filesystem.delete_file(info.path)


def upload_dir(source: Path, destination: str) -> None:
    """Copy a local directory to a local path or a URI."""
    filesystem, path = filesystem_of(destination)
    filesystem.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(
        str(source), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=filesystem
    )
