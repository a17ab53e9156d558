"""Where runs, reports and registries live: a local path or a URI, read and written one way.

A location is a local path (``runs``, ``/mnt/shared/runs``) or a pyarrow filesystem URI (``file:///...``,
``s3://bucket/runs``, ``gs://...``). Every module that reads or writes one goes through
:func:`filesystem_of`, so a local directory and an object store behave the same. Text files are written
beside their target and moved into place, so a reader never sees half a file.
"""

from __future__ import annotations

import posixpath
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs

from qlora_ray.errors import QloraRayError


class StorageError(QloraRayError, ValueError):
    """A location that cannot be opened; the message names it and what to give instead."""


def is_uri(location: str) -> bool:
    return "://" in location


def filesystem_of(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem of a local path or a URI, and the path inside it (no trailing slash)."""
    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
    except (ValueError, OSError, NotImplementedError) as err:
        raise StorageError(
            f"cannot open {location!r}: {err}. Give a local path or a URI pyarrow supports (file://, s3://, gs://)"
        ) from None
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
    """Write ``text`` to ``location`` whole: written beside it under a unique name, then moved into place."""
    filesystem, path = filesystem_of(location)
    write_bytes_atomic(filesystem, path, text.encode())


def write_bytes_atomic(filesystem: Any, path: str, data: bytes) -> None:
    """``data`` to ``path`` on ``filesystem`` through a sibling staging file and a move."""
    parent = posixpath.dirname(path)
    filesystem.create_dir(parent, recursive=True)
    staging = f"{parent}/.{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}"
    with filesystem.open_output_stream(staging) as out:
        out.write(data)
    filesystem.move(staging, path)


def upload_dir(source: Path, destination: str) -> None:
    """Copy a local directory to a local path or a URI."""
    filesystem, path = filesystem_of(destination)
    filesystem.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(
        str(source), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=filesystem
    )
