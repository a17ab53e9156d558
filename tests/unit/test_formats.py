import csv
import json

import pytest

from data.formats import FORMATS, DataError, Format, RowProblem, leading_tag, load_examples, new_example
from data.formats.base import single_turn, text_field
from data.templates import build_prompt, example_from_messages, messages_for, question_of
from qlora_ray.config import ConfigError, from_dict

PC_ROWS = [
    {"prompt": "<GALAXY>What is the galaxy store?", "completion": "An app store."},
    {"prompt": "<GENERAL>hello", "completion": "Hello!"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _check_prompt_completion(loaded):
    assert loaded.format == "prompt_completion"
    assert [e["prompt"] for e in loaded.examples] == [r["prompt"] for r in PC_ROWS]
    assert [e["completion"] for e in loaded.examples] == [r["completion"] for r in PC_ROWS]
    assert [e["tag"] for e in loaded.examples] == ["<GALAXY>", "<GENERAL>"]


def test_prompt_completion_from_jsonl_json_csv_parquet_and_datasets_dir(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_prompt_completion(load_examples(str(_write_jsonl(tmp_path / "a.jsonl", PC_ROWS))))
    (tmp_path / "a.json").write_text(json.dumps(PC_ROWS))
    _check_prompt_completion(load_examples(str(tmp_path / "a.json")))
    with (tmp_path / "a.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(PC_ROWS)
    _check_prompt_completion(load_examples(str(tmp_path / "a.csv")))
    pq.write_table(pa.Table.from_pylist(PC_ROWS), tmp_path / "a.parquet")
    _check_prompt_completion(load_examples(str(tmp_path / "a.parquet")))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PC_ROWS)}).save_to_disk(str(tmp_path / "ds"))
    _check_prompt_completion(load_examples(str(tmp_path / "ds")))
    with pytest.raises(DataError, match="no split 'test'"):
        load_examples(str(tmp_path / "ds"), split="test")


def test_squad_lists_and_dict_keyed_variant_give_the_same_examples(tmp_path):
    qa = {"id": "q1", "question": "What is the yield strength?", "answers": [{"text": "1.2 GPa", "answer_start": 22}]}
    standard = {"data": [{"title": "t", "paragraphs": [{"context": "The yield strength is 1.2 GPa.", "qas": [qa]}]}]}
    keyed_qa = {**qa, "answers": {"0": qa["answers"][0]}}
    keyed = {
        "data": {"0": {"paragraphs": {"0": {"context": "The yield strength is 1.2 GPa.", "qas": {"0": keyed_qa}}}}}
    }
    (tmp_path / "std.json").write_text(json.dumps(standard))
    (tmp_path / "keyed.json").write_text(json.dumps(keyed))
    a = load_examples(str(tmp_path / "std.json"))
    b = load_examples(str(tmp_path / "keyed.json"))
    assert a.format == b.format == "context_qa"
    for loaded in (a, b):
        (example,) = loaded.examples
        assert example["context"] == "The yield strength is 1.2 GPa."
        assert example["question"] == "What is the yield strength?"
        assert (example["completion"], example["answer_start"]) == ("1.2 GPa", 22)
    assert a.examples[0]["where"].endswith("data[0].paragraphs[0].qas[0]")


def test_flat_squad_rows_as_in_hugging_face_squad(tmp_path):
    row = {"context": "Sky is blue.", "question": "What colour?", "answers": {"text": ["blue"], "answer_start": [7]}}
    loaded = load_examples(str(_write_jsonl(tmp_path / "s.jsonl", [row])))
    assert loaded.format == "context_qa"
    assert (loaded.examples[0]["completion"], loaded.examples[0]["answer_start"]) == ("blue", 7)


def test_chat_and_alpaca_rows(tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "<RAY>what is ray?"},
            {"role": "assistant", "content": "A framework."},
        ]
    }
    loaded = load_examples(str(_write_jsonl(tmp_path / "c.jsonl", [chat])))
    assert loaded.format == "chat"
    (example,) = loaded.examples
    assert example["messages"] == chat["messages"][:2]
    assert (example["completion"], example["tag"]) == ("A framework.", "<RAY>")

    alpaca = [
        {"instruction": "Summarise", "input": "long text", "output": "short"},
        {"instruction": "Hi", "output": "Hey"},
    ]
    loaded = load_examples(str(_write_jsonl(tmp_path / "al.jsonl", alpaca)))
    assert loaded.format == "alpaca"
    assert [(e["question"], e["context"], e["completion"]) for e in loaded.examples] == [
        ("Summarise", "long text", "short"),
        ("Hi", "", "Hey"),
    ]


def test_every_bad_row_is_listed_with_file_line_and_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "ok", "completion": "fine"}).encode(),
        json.dumps({"prompt": "no answer"}).encode(),
        json.dumps({"prompt": 3, "completion": "x"}).encode(),
        json.dumps({"prompt": "empty", "completion": "  "}).encode(),
        b'{"prompt": "broken", ',
        b'{"prompt": "\xff\xfe", "completion": "x"}',
        json.dumps(["not", "an", "object"]).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as info:
        load_examples(str(path), fmt="prompt_completion")
    text = str(info.value)
    assert "6 bad row(s)" in text
    assert f"{path}:2: missing field 'completion'" in text
    assert f"{path}:3: field 'prompt' must be a string, got int" in text
    assert f"{path}:4: field 'completion' is empty" in text
    assert f"{path}:5: not valid JSON" in text
    assert f"{path}:6: not UTF-8" in text
    assert f"{path}:7: a row must be an object, got list" in text
    assert "data.on_bad_rows: skip" in text

    skipped = load_examples(str(path), fmt="prompt_completion", on_bad_rows="skip")
    assert [e["prompt"] for e in skipped.examples] == ["ok"]
    assert len(skipped.bad_rows) == 6


def test_many_bad_rows_list_the_first_twenty_and_count_the_rest(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": ""} for i in range(25)] + [{"prompt": "q", "completion": "a"}]
    with pytest.raises(DataError) as info:
        load_examples(str(_write_jsonl(tmp_path / "many.jsonl", rows)))
    text = str(info.value)
    assert "25 bad row(s)" in text and "... and 5 more" in text
    assert text.count("field 'completion' is empty") == 20


def test_bad_qa_rows_name_their_location(tmp_path):
    doc = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": "c",
                        "qas": [
                            {"question": "q", "answers": []},
                            {"question": "q2", "answers": [{"text": "", "answer_start": 0}]},
                            {"question": "q3", "answers": [{"text": "c", "answer_start": 0}]},
                        ],
                    }
                ]
            }
        ]
    }
    (tmp_path / "qa.json").write_text(json.dumps(doc))
    with pytest.raises(DataError) as info:
        load_examples(str(tmp_path / "qa.json"))
    text = str(info.value)
    assert "qas[0]: missing answer" in text and "qas[1]: the answer text is empty" in text


def test_unparseable_and_missing_files(tmp_path):
    (tmp_path / "x.json").write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(DataError, match=r"x.json:2:\d+: not valid JSON"):
        load_examples(str(tmp_path / "x.json"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_examples(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="no such file or directory"):
        load_examples(str(tmp_path / "absent.jsonl"))
    (tmp_path / "odd.jsonl").write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_examples(str(tmp_path / "odd.jsonl"))


def test_hub_dataset_name_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="loading it from the dataset hub failed"):
        load_examples("someone/no-such-dataset-here")


def test_leading_tag():
    assert leading_tag("<ALIBABA>What is OSS?") == "<ALIBABA>"
    assert leading_tag("What is <b>?") is None


@pytest.mark.parametrize(
    ("name", "fmt", "rows", "tags"),
    [
        ("galaxy_alibaba_qa.json", "prompt_completion", 1097, {"<ALIBABA>": 891, "<GALAXY>": 161, "<GENERAL>": 45}),
        ("hea_qa_squad.json", "context_qa", 3392, {None: 3392}),
    ],
)
def test_seed_datasets_load_completely(seed_data, name, fmt, rows, tags):
    from collections import Counter

    loaded = load_examples(str(seed_data / name))
    assert loaded.format == fmt and len(loaded.examples) == rows and not loaded.bad_rows
    assert Counter(e["tag"] for e in loaded.examples) == tags


def test_detection_takes_the_first_format_in_table_order(tmp_path):
    # A row that fits several formats: "messages" wins, then instruction/output, then prompt/completion.
    both = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}], "output": "o"}
    both |= {"instruction": "i", "prompt": "p", "completion": "c", "context": "x", "question": "q", "answers": "x"}
    assert load_examples(str(_write_jsonl(tmp_path / "a.jsonl", [both]))).format == "chat"
    del both["messages"]
    assert load_examples(str(_write_jsonl(tmp_path / "b.jsonl", [both]))).format == "alpaca"
    del both["instruction"]
    assert load_examples(str(_write_jsonl(tmp_path / "c.jsonl", [both]))).format == "prompt_completion"
    del both["prompt"]
    assert load_examples(str(_write_jsonl(tmp_path / "d.jsonl", [both]))).format == "context_qa"
    assert list(FORMATS)[:4] == ["chat", "alpaca", "prompt_completion", "context_qa"]


def test_the_formats_table_drives_the_config():
    for name in ("auto", *FORMATS):
        assert from_dict({"data": {"format": name}}).data.format == name
    with pytest.raises(ConfigError) as info:
        from_dict({"data": {"format": "tweets"}})
    (problem,) = info.value.problems
    assert problem.startswith("data.format: 'tweets' is not a data format")
    assert all(f" {name}," in problem or f" {name};" in problem for name in ("auto", *FORMATS)), problem


class _AskReply(Format):
    """A throwaway format for the test below: {"ask", "reply"} rows, prompted as "Question : ... Answer :"."""

    name = "ask_reply"
    fields = "ask/reply"

    def detect(self, keys: set[str]) -> bool:
        return {"ask", "reply"} <= keys

    def normalise(self, row, where):
        if row.get("lang", "en") != "en":
            raise RowProblem("only English rows")
        ask = text_field(row, "ask")
        return new_example(where, self.name, text_field(row, "reply"), question=ask, tag=leading_tag(ask))

    def prompt(self, example, template, tokenizer):
        return f"Question : {example['question']} Answer :"

    def messages(self, example):
        return [{"role": "user", "content": example["question"]}]

    def question(self, example):
        return "", example["question"]

    def from_messages(self, messages):
        return {"format": self.name, "question": single_turn(messages)[1]}

    def shorten_prompt(self, example, prompt, budget, tokenizer, render):
        return None  # this format drops a row rather than cut its question


def test_a_format_is_one_unit_registered_in_one_table(tmp_path, monkeypatch, tiny_tokenizer):
    from data.tokenize import TokenizeSettings, tokenize_example

    rows = [{"ask": "<GALAXY>why is the sky blue?", "reply": "the sky ."}, {"ask": "why?", "reply": "x", "lang": "fr"}]
    path = str(_write_jsonl(tmp_path / "ask.jsonl", rows))
    with pytest.raises(DataError, match="cannot tell the format"):
        load_examples(path)  # not registered yet
    with monkeypatch.context() as patch:
        patch.setitem(FORMATS, "ask_reply", _AskReply())
        loaded = load_examples(path, on_bad_rows="skip")
        assert loaded.format == "ask_reply" and [b.reason for b in loaded.bad_rows] == ["only English rows"]
        (example,) = loaded.examples
        assert (example["question"], example["completion"], example["tag"]) == (rows[0]["ask"], "the sky .", "<GALAXY>")
        assert build_prompt(example, "{context} {question}") == "Question : <GALAXY>why is the sky blue? Answer :"
        assert question_of(example) == ("", "<GALAXY>why is the sky blue?")
        asked = example_from_messages([{"role": "system", "content": "s"}, *messages_for(example)], "ask_reply")
        assert build_prompt(asked, "") == build_prompt(example, "")
        row, outcome = tokenize_example(example, tiny_tokenizer, TokenizeSettings("", max_seq_len=64))
        assert outcome == "ok" and row["input_ids"][:3] == tiny_tokenizer("Question : <")["input_ids"]
        assert tokenize_example(example, tiny_tokenizer, TokenizeSettings("", max_seq_len=16)) == (None, "skipped")
        assert from_dict({"data": {"format": "ask_reply"}}).data.format == "ask_reply"
    with pytest.raises(ConfigError, match="'ask_reply' is not a data format"):
        from_dict({"data": {"format": "ask_reply"}})  # gone with its table entry
