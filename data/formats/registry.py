"""The one table of data formats: ``data.format`` accepts ``auto`` or a name in :data:`FORMATS`.

Adding a format is a module that subclasses :class:`data.formats.base.Format`, one line below, and its tests;
the config, loading, templates, tokenisation, the model card and Serve all ask the table.
"""

from __future__ import annotations

from data.formats.alpaca import Alpaca
from data.formats.base import DataError, Format
from data.formats.chat import Chat
from data.formats.context_qa import ContextQA
from data.formats.prompt_completion import PromptCompletion

# Order matters: auto-detection takes the first format whose fields a row has, so formats with the more
# telling fields come first ("messages" beats anything; instruction/output beats a stray prompt column).
FORMATS: dict[str, Format] = {fmt.name: fmt for fmt in (Chat(), Alpaca(), PromptCompletion(), ContextQA())}
AUTO = "auto"


def format_named(name: str) -> Format:
    """The registered format called ``name``.

    Raises:
        DataError: no format has that name; the message lists those that do.
    """
    fmt = FORMATS.get(name)
    if fmt is None:
        raise DataError(f"unknown data.format {name!r}; use one of {', '.join(FORMATS)} or {AUTO}")
    return fmt


def detect_format(keys: set[str]) -> Format | None:
    """The first format, in table order, whose fields a row with these keys has; None when none fits."""
    return next((fmt for fmt in FORMATS.values() if fmt.detect(keys)), None)
