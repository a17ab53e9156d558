"""The ``chat`` format: ``{"messages": [{"role", "content"}, ...]}`` rows whose last message is the answer.

The prompt is the tokenizer's own chat template over the messages before the answer, so a chat model is
fine-tuned in the layout it was pretrained on.
"""

from __future__ import annotations

from typing import Any

from data.formats.base import Format, RowProblem, leading_tag, new_example, text_field

ROLES = {"system", "user", "assistant"}


class Chat(Format):
    name = "chat"
    fields = "messages"

    def detect(self, keys: set[str]) -> bool:
        return "messages" in keys

    def normalise(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        messages = row.get("messages")
        if not isinstance(messages, list) or len(messages) < 2:
            raise RowProblem("'messages' must be a list of at least a user and an assistant message")
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise RowProblem(f"messages[{i}] needs a role among {sorted(ROLES)}")
            clean.append({"role": message["role"], "content": text_field(message, "content")})
        if clean[-1]["role"] != "assistant":
            raise RowProblem("the last message must be the assistant's answer")
        first_user = next((m["content"] for m in clean if m["role"] == "user"), "")
        return new_example(where, self.name, clean[-1]["content"], messages=clean[:-1], tag=leading_tag(first_user))

    def prompt(self, example: dict[str, Any], template: str, tokenizer: Any) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat rows need a tokenizer with a chat template; this model has none. Use prompt/completion "
                "rows, or a model whose tokenizer_config.json carries a chat_template"
            )
        return tokenizer.apply_chat_template(example["messages"], tokenize=False, add_generation_prompt=True)

    def messages(self, example: dict[str, Any]) -> list[dict[str, str]]:
        return list(example["messages"])

    def question(self, example: dict[str, Any]) -> tuple[str, str]:
        # A chat's system messages are instructions, not a passage, so a chat has no context.
        users = [m["content"] for m in example["messages"] if m["role"] == "user"]
        return "", users[-1] if users else ""

    def from_messages(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        return {"format": self.name, "messages": messages}  # the whole conversation, for the chat template

    def asks_one_question(self, example: dict[str, Any]) -> bool:
        # A later turn's answer depends on the earlier turns, so only a lone question is one.
        return sum(m["role"] != "system" for m in example["messages"]) <= 1
