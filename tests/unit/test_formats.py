import csv
import json

import pytest

from data.formats import DataError, leading_tag, load_examples

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
