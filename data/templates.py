"""The one prompt formatter: training, evaluation and serving all build prompts here.

Each function asks the example's format (:data:`data.formats.FORMATS`) what to do, so these are the stable
entry points and the formats hold the behaviour. Tags such as ``<GALAXY>`` stay plain text inside the prompt;
no special tokens are added.
"""

from __future__ import annotations

from typing import Any

from data.formats.registry import format_named


def build_prompt(example: dict[str, Any], template: str, tokenizer: Any = None) -> str:
    """Render the prompt of a normalised example (see ``data.formats``).

    Args:
        example: a normalised example; its ``completion`` is not used.
        template: ``data.template``, for formats that use it (context QA).
        tokenizer: needed only by formats that render with the tokenizer's chat template (chat).

    Raises:
        ValueError: the example's format is unknown, or cannot be rendered with this tokenizer.
    """
    return format_named(example["format"]).prompt(example, template, tokenizer)


def messages_for(example: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages that ask ``example``'s question: what :func:`example_from_messages` turns back into it."""
    return format_named(example["format"]).messages(example)


def question_of(example: dict[str, Any]) -> tuple[str, str]:
    """What an example asks, as (context, question): the prompt, the question, or a chat's last user message.

    The context is the passage of ``context_qa`` and ``alpaca`` rows; a chat's system messages are instructions,
    not a passage, so chats have none.
    """
    return format_named(example["format"]).question(example)


def example_from_messages(messages: list[dict[str, str]], fmt: str) -> dict[str, Any]:
    """A chat request's messages as the normalised example of a model trained on ``fmt`` rows.

    ``chat`` keeps the conversation for the chat template. The other formats are single-turn: the last user
    message is the prompt (``prompt_completion``) or the question (``context_qa``, ``alpaca``), and the system
    messages, if any, are the context.

    Raises:
        ValueError: ``fmt`` is unknown, or the messages cannot be asked in it (no user message).
    """
    return format_named(fmt).from_messages(messages)
