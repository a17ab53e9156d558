"""What a data format is: the :class:`Format` interface, and the example dict and row helpers formats share.

A format turns one dataset row into an *example* and knows everything else that depends on the row's shape:
how auto-detection recognises it, how its prompt is rendered, how it is asked as chat messages (and how a chat
request becomes one of its examples), what question it asks for grounding, and how an over-long prompt is
shortened. Everything outside ``data/formats`` asks the format through this interface instead of comparing
format names, so a new format is one module plus one line in :mod:`data.formats.registry`.

An example is a plain dict (it crosses Ray process boundaries) with the keys of :data:`EXAMPLE_KEYS`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from qlora_ray.errors import QloraRayError

EXAMPLE_KEYS = (
    "where",
    "format",
    "tag",
    "prompt",
    "completion",
    "context",
    "question",
    "answer_start",
    "messages",
)
_TAG = re.compile(r"^\s*<([A-Za-z][A-Za-z0-9_-]*)>")


class DataError(QloraRayError, ValueError):
    """A dataset that cannot be used as it is; the message names the file, rows and fix."""


class RowProblem(ValueError):
    """Raised by :meth:`Format.normalise` for a row it cannot use; the message is the reason, without the row."""


@dataclass
class BadRow:
    """A row that could not be used: where it is (file and line, or SQuAD path) and why."""

    where: str
    reason: str


class Format(ABC):
    """One row format. Subclasses set :attr:`name` and :attr:`fields` and implement the abstract methods.

    The defaults below fit single-turn formats whose prompt may be cut from the left; a format overrides
    them only where it differs.
    """

    name: ClassVar[str]
    """The ``data.format`` value, and the ``format`` key of its examples."""
    fields: ClassVar[str]
    """Its row fields as people write them (``"prompt/completion"``), for the error when detection fails."""
    uses_template: ClassVar[bool] = False
    """Whether :meth:`prompt` renders ``data.template`` (the model card then shows the template)."""

    @abstractmethod
    def detect(self, keys: set[str]) -> bool:
        """Whether a row with these field names is in this format (the registry's order decides ties)."""

    @abstractmethod
    def normalise(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        """The example of one row (see :func:`new_example`).

        Raises:
            RowProblem: the row cannot be used; the message says why.
        """

    @abstractmethod
    def prompt(self, example: dict[str, Any], template: str, tokenizer: Any) -> str:
        """The prompt text the model sees before the completion (``template`` is ``data.template``)."""

    @abstractmethod
    def messages(self, example: dict[str, Any]) -> list[dict[str, str]]:
        """The chat messages that ask the example's question: :meth:`from_messages` turns them back into it."""

    @abstractmethod
    def question(self, example: dict[str, Any]) -> tuple[str, str]:
        """What the example asks, as (context passage or "", question), for grounding and evaluation."""

    @abstractmethod
    def from_messages(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """A chat request's messages as an example of this format (without ``completion`` or ``where``).

        Raises:
            ValueError: the messages cannot be asked in this format; the message says what to change.
        """

    def from_prompt(self, prompt: str) -> dict[str, Any] | None:
        """A raw completion request's prompt as an example, or None when a raw prompt is not one.

        Serve sends such a prompt to the model as it is; only an example can also be grounded.
        """
        return None

    def asks_one_question(self, example: dict[str, Any]) -> bool:
        """Whether the example is one self-contained question (grounding answers only those)."""
        return True

    def shorten_prompt(
        self,
        example: dict[str, Any],
        prompt: list[int],
        budget: int,
        tokenizer: Any,
        render: Callable[[dict[str, Any]], list[int]],
    ) -> list[int] | None:
        """Prompt token ids cut to at most ``budget`` (>= 1) tokens, or None when the row cannot be kept.

        Args:
            example: the example whose prompt is too long.
            prompt: its prompt's token ids.
            budget: the tokens left for the prompt beside the completion.
            tokenizer: the tokenizer that made ``prompt``.
            render: the token ids of another example's prompt, rendered and encoded as ``prompt`` was.
        """
        return prompt[len(prompt) - budget :]  # keep the end, next to the completion


class QuestionWithContext(Format):
    """A single-turn format whose examples hold a ``question`` and an optional ``context`` passage.

    As chat messages the passage is a system message and the question the user message, both ways.
    """

    def messages(self, example: dict[str, Any]) -> list[dict[str, str]]:
        context = [{"role": "system", "content": example["context"]}] if example.get("context") else []
        return [*context, {"role": "user", "content": example["question"]}]

    def question(self, example: dict[str, Any]) -> tuple[str, str]:
        return example.get("context") or "", example["question"]

    def from_messages(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        context, question = single_turn(messages)
        return {"format": self.name, "question": question, "context": context}


def new_example(where: str, fmt: str, completion: str, **fields: Any) -> dict[str, Any]:
    """An example dict: every key of :data:`EXAMPLE_KEYS`, None where ``fields`` does not set it."""
    example = dict.fromkeys(EXAMPLE_KEYS)
    example.update(where=where, format=fmt, completion=completion, **fields)
    return example


def text_field(row: dict[str, Any], key: str, required: bool = True) -> str:
    """``row[key]`` as a string; a missing optional field is "".

    Raises:
        RowProblem: the field is missing or empty (when required), or not a string.
    """
    if key not in row or row[key] is None:
        if required:
            raise RowProblem(f"missing field {key!r}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowProblem(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowProblem(f"field {key!r} is empty")
    return value


def indexed_items(value: Any) -> list[tuple[str, Any]]:
    """Index/value pairs of a SQuAD list, or of the HEA seed's objects keyed "0", "1", ...; [] for anything else."""
    if isinstance(value, list):
        return [(str(i), v) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return list(value.items())
    return []


def leading_tag(text: str) -> str | None:
    """The ``<TAG>`` a prompt starts with (kept as plain text in the prompt), or None."""
    match = _TAG.match(text)
    return f"<{match.group(1)}>" if match else None


def single_turn(messages: list[dict[str, str]]) -> tuple[str, str]:
    """(system messages joined as the context, last user message) of a chat request, for single-turn formats.

    Raises:
        ValueError: there is no user message.
    """
    user = [m["content"] for m in messages if m["role"] == "user"]
    if not user:
        raise ValueError("messages: there is no user message to answer; add one with role 'user'")
    return "\n".join(m["content"] for m in messages if m["role"] == "system"), user[-1]
