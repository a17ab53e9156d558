"""The ``prompt_completion`` format: ``{"prompt", "completion"}`` rows, the prompt sent to the model as written.

The organisation FAQ seed is in this format; a leading ``<TAG>`` in the prompt stays plain text and is the
example's tag (the holdout split is stratified by it).
"""

from __future__ import annotations

from typing import Any

from data.formats.base import Format, leading_tag, new_example, single_turn, text_field


class PromptCompletion(Format):
    name = "prompt_completion"
    fields = "prompt/completion"

    def detect(self, keys: set[str]) -> bool:
        return {"prompt", "completion"} <= keys

    def normalise(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        prompt = text_field(row, "prompt")
        return new_example(where, self.name, text_field(row, "completion"), prompt=prompt, tag=leading_tag(prompt))

    def prompt(self, example: dict[str, Any], template: str, tokenizer: Any) -> str:
        return example["prompt"]

    def messages(self, example: dict[str, Any]) -> list[dict[str, str]]:
        return [{"role": "user", "content": example["prompt"]}]

    def question(self, example: dict[str, Any]) -> tuple[str, str]:
        return "", example["prompt"]

    def from_messages(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        # The model saw bare prompts in training: the last user message is one, and the system messages
        # (which such a model never saw) are dropped.
        _, prompt = single_turn(messages)
        return {"format": self.name, "prompt": prompt}

    def from_prompt(self, prompt: str) -> dict[str, Any] | None:
        return {"format": self.name, "prompt": prompt}  # a raw prompt is exactly what training prompts were
