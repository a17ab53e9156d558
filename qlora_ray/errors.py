"""The base class of every error this project raises for a user to fix.

A :class:`QloraRayError` is a problem with the user's input or environment (a config key, a data row, an
adapter name, an unreachable cluster): its message says what is wrong and how to fix it, and the command
line prints it as ``error: <message>`` with exit status 1, without a traceback. Anything else that escapes
is a bug and keeps its traceback. This module imports nothing, so every package (``data`` included) may
derive its errors from it.
"""

from __future__ import annotations


class QloraRayError(Exception):
    """A problem the user can fix; the message names the file, key or field and the fix."""
