"""The ``alpaca`` format: ``{"instruction", "input", "output"}`` rows in the Stanford Alpaca prompt layout.

The instruction is the example's question and the optional input its context passage.
"""

from __future__ import annotations

from typing import Any

from data.formats.base import QuestionWithContext, leading_tag, new_example, text_field

TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class Alpaca(QuestionWithContext):
    name = "alpaca"
    fields = "instruction/input/output"

    def detect(self, keys: set[str]) -> bool:
        return {"instruction", "output"} <= keys  # "input" is optional in Alpaca data

    def normalise(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        instruction = text_field(row, "instruction")
        fields = {"question": instruction, "context": text_field(row, "input", required=False)}
        return new_example(where, self.name, text_field(row, "output"), tag=leading_tag(instruction), **fields)

    def prompt(self, example: dict[str, Any], template: str, tokenizer: Any) -> str:
        # Alpaca has its own fixed layout; data.template is for context QA.
        if example.get("context"):
            return TEMPLATE.format(instruction=example["question"], input=example["context"])
        return TEMPLATE_NO_INPUT.format(instruction=example["question"])
