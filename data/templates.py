"""The one prompt formatter: training, evaluation and serving all build prompts here.

Tags such as ``<GALAXY>`` stay plain text inside the prompt; no special tokens are added.
"""

from __future__ import annotations

from typing import Any

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def build_prompt(example: dict[str, Any], template: str, tokenizer: Any = None) -> str:
    """Render the prompt of a normalised example (see ``data.formats``).

    Args:
        example: a normalised example; its ``completion`` is not used.
        template: ``data.template`` for context QA rows.
        tokenizer: needed only for chat rows, which use the tokenizer's chat template.
    """
    fmt = example["format"]
    if fmt == "prompt_completion":
        return example["prompt"]
    if fmt == "context_qa":
        return template.format(context=example["context"], question=example["question"])
    if fmt == "alpaca":
        if example.get("context"):
            return ALPACA_TEMPLATE.format(instruction=example["question"], input=example["context"])
        return ALPACA_TEMPLATE_NO_INPUT.format(instruction=example["question"])
    if fmt == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat rows need a tokenizer with a chat template; this model has none. Use prompt/completion "
                "rows, or a model whose tokenizer_config.json carries a chat_template"
            )
        return tokenizer.apply_chat_template(example["messages"], tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown example format {fmt!r}")


def messages_for(example: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages that ask ``example``'s question: what :func:`example_from_messages` turns back into it."""
    fmt = example["format"]
    if fmt == "chat":
        return list(example["messages"])
    if fmt == "prompt_completion":
        return [{"role": "user", "content": example["prompt"]}]
    context = [{"role": "system", "content": example["context"]}] if example.get("context") else []
    return [*context, {"role": "user", "content": example["question"]}]


def question_of(example: dict[str, Any]) -> tuple[str, str]:
    """What an example asks, as (context, question): the prompt, the question, or a chat's last user message.

    The context is the passage of ``context_qa`` and ``alpaca`` rows; a chat's system messages are instructions,
    not a passage, so chats have none.
    """
    fmt = example["format"]
    if fmt == "chat":
        users = [m["content"] for m in example["messages"] if m["role"] == "user"]
        return "", users[-1] if users else ""
    if fmt == "prompt_completion":
        return "", example["prompt"]
    return example.get("context") or "", example["question"]


def example_from_messages(messages: list[dict[str, str]], fmt: str) -> dict[str, Any]:
    """A chat request's messages as the normalised example of a model trained on ``fmt`` rows.

    ``chat`` keeps the conversation for the chat template. The other formats are single-turn: the last user
    message is the prompt (``prompt_completion``) or the question (``context_qa``, ``alpaca``), and the system
    messages, if any, are the context.
    """
    if fmt == "chat":
        return {"format": "chat", "messages": messages}
    user = [m["content"] for m in messages if m["role"] == "user"]
    if not user:
        raise ValueError("messages: there is no user message to answer; add one with role 'user'")
    context = "\n".join(m["content"] for m in messages if m["role"] == "system")
    if fmt in ("context_qa", "alpaca"):
        return {"format": fmt, "question": user[-1], "context": context}
    return {"format": "prompt_completion", "prompt": user[-1]}
