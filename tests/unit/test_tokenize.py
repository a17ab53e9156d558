import pytest
from conftest import EOS, word_vocab

from data.formats import new_example
from data.tokenize import (
    IGNORE_INDEX,
    OverlengthError,
    TokenizeSettings,
    batch_order,
    collate,
    length_stats,
    tokenize_example,
    tokenize_examples,
    useful_fraction,
)

V = word_vocab()
QA_TEMPLATE = "{context}\nQuestion: {question}\nAnswer:"


def ids(words: str) -> list[int]:
    return [V[w] for w in words.split()]


def settings(max_seq_len=64, **kwargs):
    return TokenizeSettings(template=QA_TEMPLATE, max_seq_len=max_seq_len, **kwargs)


def pc(prompt, completion):
    return new_example("t:1", "prompt_completion", completion, prompt=prompt)


def test_prompt_is_masked_and_eos_is_appended_and_trained(tiny_tokenizer):
    row, outcome = tokenize_example(
        pc("<GALAXY>what is the galaxy store?", "a cloud store."), tiny_tokenizer, settings()
    )
    prompt, completion = ids("< GALAXY > what is the galaxy store ?"), ids("a cloud store .")
    assert outcome == "ok"
    assert row["input_ids"] == prompt + completion + [V[EOS]]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [V[EOS]]


def test_train_on_prompt_keeps_every_label(tiny_tokenizer):
    row, _ = tokenize_example(pc("hello world", "fine thanks"), tiny_tokenizer, settings(train_on_prompt=True))
    assert row["labels"] == row["input_ids"] == ids("hello world fine thanks") + [V[EOS]]


def test_context_qa_uses_the_template(tiny_tokenizer):
    example = new_example("t:1", "context_qa", "9 GPa", context="the yield is 9 GPa", question="what is the yield?")
    row, _ = tokenize_example(example, tiny_tokenizer, settings())
    prompt = ids("the yield is 9 GPa Question : what is the yield ? Answer :")
    assert row["input_ids"] == prompt + ids("9 GPa") + [V[EOS]]
    assert row["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)


def test_alpaca_and_chat_rendering(tiny_tokenizer):
    alpaca = new_example("t:1", "alpaca", "blue", question="name the colour", context="the sky")
    row, _ = tokenize_example(alpaca, tiny_tokenizer, settings())
    prompt = ids("### Instruction : name the colour ### Input : the sky ### Response :")
    assert row["input_ids"] == prompt + ids("blue") + [V[EOS]]

    chat = new_example("t:1", "chat", "blue", messages=[{"role": "user", "content": "the sky ?"}])
    with pytest.raises(ValueError, match="chat template"):
        tokenize_example(chat, tiny_tokenizer, settings())
    tok = tiny_tokenizer
    original = tok.chat_template
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    try:
        row, _ = tokenize_example(chat, tok, settings())
    finally:
        tok.chat_template = original
    prompt = ids("user : the sky ? assistant :")
    assert row["input_ids"] == prompt + ids("blue") + [V[EOS]]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + ids("blue") + [V[EOS]]


def _long_context(answer_at: int, n: int = 40) -> tuple[str, int]:
    words = ["1"] * n
    words[answer_at : answer_at + 2] = ["9", "GPa"]
    context = " ".join(words)
    return context, context.index("9 GPa")


@pytest.mark.parametrize("answer_at", [0, 20, 38])
def test_long_context_keeps_a_window_with_the_answer(tiny_tokenizer, answer_at):
    context, start = _long_context(answer_at)
    example = new_example("t:7", "context_qa", "9 GPa", context=context, question="what ?", answer_start=start)
    row, outcome = tokenize_example(example, tiny_tokenizer, settings(max_seq_len=20))
    assert outcome == "truncated"
    assert len(row["input_ids"]) <= 20
    prompt = row["input_ids"][: row["labels"].index(V["9"])]
    assert any(prompt[i : i + 2] == ids("9 GPa") for i in range(len(prompt)))  # the answer is still in the context
    assert prompt[-5:] == ids("Question : what ? Answer :")[-5:]
    assert row["labels"][-3:] == ids("9 GPa") + [V[EOS]]


def test_wrong_answer_start_is_corrected_by_searching_the_context(tiny_tokenizer):
    context, _ = _long_context(30)
    example = new_example("t:7", "context_qa", "9 GPa", context=context, question="what ?", answer_start=0)
    row, outcome = tokenize_example(example, tiny_tokenizer, settings(max_seq_len=20))
    prompt = row["input_ids"][:-3]
    assert outcome == "truncated" and any(prompt[i : i + 2] == ids("9 GPa") for i in range(len(prompt)))


def test_answer_that_cannot_fit_is_skipped_not_cut(tiny_tokenizer):
    context = " ".join(["9"] * 30)
    example = new_example("t:9", "context_qa", context, context=context, question="what ?", answer_start=0)
    row, outcome = tokenize_example(example, tiny_tokenizer, settings(max_seq_len=20))
    assert (row, outcome) == (None, "skipped")


def test_other_formats_cut_the_prompt_from_the_left(tiny_tokenizer):
    prompt = " ".join(str(i % 10) for i in range(30))
    row, outcome = tokenize_example(pc(prompt, "fine"), tiny_tokenizer, settings(max_seq_len=10))
    assert outcome == "truncated"
    assert row["input_ids"] == ids(prompt)[-8:] + ids("fine") + [V[EOS]]


def test_overlength_skip_and_error_policies_are_counted_or_raised(tiny_tokenizer):
    long = pc(" ".join(["1"] * 30), "fine")
    short = pc("hello", "fine")
    rows, report = tokenize_examples([short, long, short], tiny_tokenizer, settings(max_seq_len=10, overlength="skip"))
    assert [r is None for r in rows] == [False, True, False]
    assert (report.rows, report.skipped, report.truncated, report.examples["skipped"]) == (3, 1, 0, ["t:1"])
    with pytest.raises(OverlengthError, match=r"t:1: 32 tokens > train.max_seq_len 10"):
        tokenize_examples([long], tiny_tokenizer, settings(max_seq_len=10, overlength="error"))


def test_collate_pads_per_batch_and_keeps_eos_labels_when_pad_is_eos(tiny_tokenizer):
    rows = [
        tokenize_example(pc("hello world", "fine"), tiny_tokenizer, settings())[0],
        {"input_ids": [5], "labels": [5]},
    ]
    pad_id = V[EOS]  # phi-2 style: no pad token, so pad = EOS
    batch = collate(rows, pad_id=pad_id)
    assert batch["input_ids"].shape == (2, 4)  # the longest row of this batch, not max_seq_len
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, V["fine"], V[EOS]]
    assert batch["labels"][1].tolist() == [5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1].tolist() == [1, 0, 0, 0]
    assert collate(rows, pad_id=pad_id, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_length_grouped_batches_cover_every_row_once_and_cut_padding():
    import random

    lengths = [random.Random(i).randint(5, 300) for i in range(1000)]
    grouped = batch_order(lengths, batch_size=8, seed=1, group_by_length=True)
    plain = batch_order(lengths, batch_size=8, seed=1, group_by_length=False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(1000))
    assert grouped == batch_order(lengths, batch_size=8, seed=1, group_by_length=True)
    assert grouped != batch_order(lengths, batch_size=8, seed=2, group_by_length=True)
    assert useful_fraction(lengths, grouped) > 0.9 > useful_fraction(lengths, plain)


def test_length_stats():
    assert length_stats(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
