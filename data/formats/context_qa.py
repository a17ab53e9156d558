"""The ``context_qa`` format: SQuAD-style rows of a context passage, a question and its answer.

Rows come as SQuAD (flattened by :mod:`data.formats.reading`, with lists or with the HEA seed's objects keyed
"0", "1", ...) or flat as Hugging Face's squad has them (``answers: {"text": [...], "answer_start": [...]}``).
The prompt is ``data.template`` filled with the context and question. Too long a prompt keeps a window of the
context around the answer, so truncation never cuts the answer away.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from data.formats.base import QuestionWithContext, RowProblem, indexed_items, new_example, text_field

_RETRIES = 4  # re-tokenising a shortened context can differ by a token or two from the estimate


class ContextQA(QuestionWithContext):
    name = "context_qa"
    fields = "context/question/answers"
    uses_template = True

    def detect(self, keys: set[str]) -> bool:
        return {"context", "question"} <= keys

    def normalise(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        context, question = text_field(row, "context"), text_field(row, "question")
        text, start = _first_answer(row.get("answers", row.get("answer")))
        if not isinstance(text, str) or not text.strip():
            raise RowProblem("the answer text is empty or not a string")
        if start is not None and not isinstance(start, int):
            raise RowProblem(f"answer_start must be an integer, got {type(start).__name__}")
        return new_example(where, self.name, text, context=context, question=question, answer_start=start)

    def prompt(self, example: dict[str, Any], template: str, tokenizer: Any) -> str:
        return template.format(context=example["context"], question=example["question"])

    def shorten_prompt(
        self,
        example: dict[str, Any],
        prompt: list[int],
        budget: int,
        tokenizer: Any,
        render: Callable[[dict[str, Any]], list[int]],
    ) -> list[int] | None:
        overflow = len(prompt) - budget
        for _ in range(_RETRIES):
            context = _context_window(example, tokenizer, overflow)
            if context is None:
                return None
            shortened = render({**example, "context": context})
            if len(shortened) <= budget:
                return shortened
            overflow += len(shortened) - budget
        return None


def _first_answer(answers: Any) -> tuple[Any, Any]:
    """(text, answer_start) of the first answer, in any of the shapes above; start may be None.

    Raises:
        RowProblem: there is no answer object at all.
    """
    if isinstance(answers, str):
        return answers, None
    if isinstance(answers, dict) and isinstance(answers.get("text"), list):  # Hugging Face squad columns
        starts = answers.get("answer_start") or [None]
        return (answers["text"] or [None])[0], starts[0]
    first = next(iter(indexed_items(answers)), (None, None))[1]
    if not isinstance(first, dict):
        raise RowProblem("missing answer: expected 'answers' with at least one {text, answer_start}")
    return first.get("text"), first.get("answer_start")


def _context_window(example: dict[str, Any], tokenizer: Any, drop: int) -> str | None:
    """The context less ``drop`` tokens, keeping the answer span inside; None if that is impossible."""
    context = example["context"]
    offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = len(offsets) - drop
    if keep <= 0:
        return None
    span = _answer_span(context, example["completion"], example["answer_start"])
    if span is None:
        first = 0  # the answer is not in the context: keep its start
    else:
        tokens = [i for i, (s, e) in enumerate(offsets) if s < span[1] and e > span[0]]
        lo, hi = tokens[0], tokens[-1] + 1
        if hi - lo > keep:
            return None
        first = min(max(0, lo - (keep - (hi - lo)) // 2), len(offsets) - keep)
    return context[offsets[first][0] : offsets[first + keep - 1][1]]


def _answer_span(context: str, answer: str, start: int | None) -> tuple[int, int] | None:
    """Character span of the answer in the context: at ``start`` when it is there, else its first occurrence."""
    if start is not None and context[start : start + len(answer)] == answer:
        return start, start + len(answer)
    found = context.find(answer)  # answer_start is wrong in some real data
    return (found, found + len(answer)) if found >= 0 else None
