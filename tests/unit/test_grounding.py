"""Grounded answers: which path answers a question, and the Q&A set an adapter's manifest leads to."""

from __future__ import annotations

import json

import pytest
from adapters import FAQ, FAQ_HOLDOUT_FRACTION, write_faq

from qlora_ray.config import ConfigError, GroundingConfig, from_dict
from qlora_ray.registry import ADAPTER_CONFIG, dataset_entry
from serve.grounding import DECLINED, MODEL, STORED, GroundingError, QASet, training_examples

ON = GroundingConfig(enabled=True)


@pytest.fixture(scope="module")
def embedder():
    from qlora_ray.metrics import Similarity

    return Similarity()


def _asked(question: str) -> dict:
    return {"format": "prompt_completion", "prompt": question}


def _adapter_dir(tmp_path, data_path):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / ADAPTER_CONFIG).write_text(
        f"data: {{path: {data_path}, format: prompt_completion, holdout_fraction: {FAQ_HOLDOUT_FRACTION}}}\n"
    )
    return directory, {"dataset": dataset_entry(str(data_path), "prompt_completion")}


@pytest.fixture(scope="module")
def faq_set(embedder, tmp_path_factory):
    home = tmp_path_factory.mktemp("faq")
    directory, manifest = _adapter_dir(home, write_faq(home / "faq.jsonl"))
    return QASet(training_examples(directory, manifest), embedder)


def test_the_q_and_a_set_is_the_training_split_without_the_holdout(faq_set, tmp_path):
    from data.dataset import split_examples
    from qlora_ray.config import DataConfig

    data = DataConfig(path=str(write_faq(tmp_path / "faq.jsonl")), holdout_fraction=FAQ_HOLDOUT_FRACTION)
    loaded, train, holdout = split_examples(data)
    assert len(holdout) == 2 and len(faq_set) == len(train) == len(FAQ) - 2
    held = {loaded.examples[i]["prompt"].split(">", 1)[1] for i in holdout}
    assert held.isdisjoint(faq_set.questions)  # stored without their tags, as they are compared
    for question in held:  # a holdout question is never answered from the set, even asked word for word
        assert faq_set.decide(_asked(question), ON).source != STORED


def test_a_known_question_gets_its_stored_answer_even_without_its_tag_or_case(faq_set):
    for asked in ("what is galaxy organisation", "<GALAXY>What is Galaxy Organisation?", "Hello"):
        verdict = faq_set.decide(_asked(asked), ON)
        assert verdict.source == STORED and verdict.score >= ON.exact_threshold, (asked, verdict)
    assert faq_set.decide(_asked("What is Galaxy Organisation?"), ON).answer == FAQ[0][1]
    assert faq_set.decide(_asked("hello"), ON).answer == FAQ[-1][1]


def test_a_far_off_question_is_declined_with_the_configured_message(faq_set):
    polite = GroundingConfig(enabled=True, decline_message="Sorry, I only know about Galaxy and Alibaba.")
    verdict = faq_set.decide(_asked("How do I bake sourdough bread?"), polite)
    assert verdict.source == DECLINED and verdict.answer == polite.decline_message
    assert verdict.score < polite.domain_threshold


def test_an_in_between_question_reaches_the_model(faq_set):
    verdict = faq_set.decide(_asked("What services does Galaxy offer?"), ON)
    assert verdict.source == MODEL and verdict.answer is None
    assert ON.domain_threshold <= verdict.score < ON.exact_threshold
    # The thresholds decide: a lower exact threshold turns the same question into a stored answer.
    loose = GroundingConfig(enabled=True, exact_threshold=verdict.score - 0.01, domain_threshold=0.2)
    assert faq_set.decide(_asked("What services does Galaxy offer?"), loose).source == STORED


def test_a_question_tagged_for_another_topic_does_not_take_that_topics_answer(faq_set):
    verdict = faq_set.decide(_asked("<ALIBABA>What is Galaxy Organisation?"), ON)
    assert verdict.source == MODEL and verdict.score > ON.exact_threshold
    assert faq_set.decide(_asked("<galaxy>What is Galaxy Organisation?"), ON).source == STORED  # any case


def test_chat_rows_are_grounded_only_as_single_questions(embedder):
    def chat(*turns, answer=""):
        roles = ["user", "assistant"] * len(turns)
        messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]
        return {"format": "chat", "messages": messages, "completion": answer}

    qa = QASet([chat("What is Galaxy Organisation?", answer="A non-profit."),
                chat("What is Galaxy Organisation?", "A non-profit.", "Where is it?", answer="In Cairo.")],
               embedder)  # fmt: skip
    assert qa.questions == ["What is Galaxy Organisation?"]  # a follow-up's answer depends on what came before
    assert qa.decide(chat("what is galaxy organisation"), ON).answer == "A non-profit."
    follow_up = qa.decide(chat("What is Galaxy Organisation?", "A non-profit.", "Where is it?"), ON)
    assert follow_up.source == MODEL  # the model sees the whole conversation; the Q&A set does not


def test_context_questions_are_answered_from_the_set_only_for_the_same_context(embedder):
    def row(context, question, answer):
        return {"format": "context_qa", "context": context, "question": question, "completion": answer}

    qa = QASet([row("Alloy A melts at 1200 C.", "What is the melting point?", "1200 C"),
                row("Alloy B melts at 900 C.", "What is the melting point?", "900 C")], embedder)  # fmt: skip
    assert qa.decide(row("Alloy B melts at 900 C.", "What is the melting point?", ""), ON).answer == "900 C"
    other = qa.decide(row("Alloy C melts at 700 C.", "What is the melting point?", ""), ON)
    assert other.source == MODEL  # a known question about an unknown passage: the model reads the passage
    new = qa.decide(row("The sky is blue in daylight.", "Which colour is the sky?", ""), ON)
    assert new.source == MODEL and new.score < ON.domain_threshold  # a passage brings its own topic: no decline


def test_an_empty_set_leaves_every_question_to_the_model(embedder):
    empty = QASet([], embedder)
    assert len(empty) == 0 and empty.decide(_asked("How do I bake sourdough bread?"), ON).source == MODEL


def test_missing_or_changed_training_data_is_a_clear_error(tmp_path):
    data = write_faq(tmp_path / "faq.jsonl")
    directory, manifest = _adapter_dir(tmp_path, data)
    data.write_text(data.read_text() + json.dumps({"prompt": "new?", "completion": "new"}) + "\n")
    with pytest.raises(GroundingError, match=r"faq\.jsonl changed since training .*restore that file"):
        training_examples(directory, manifest)
    data.unlink()
    with pytest.raises(GroundingError, match=r"faq\.jsonl \(the manifest's dataset\.path\) is not on this replica"):
        training_examples(directory, manifest)
    (directory / ADAPTER_CONFIG).unlink()
    with pytest.raises(GroundingError, match="training data is unknown"):
        training_examples(directory, manifest)


def test_grounding_settings_are_checked_and_scoped_to_adapters():
    with pytest.raises(ConfigError, match=r"domain_threshold \(0.95\) is above exact_threshold \(0.9\)"):
        from_dict({"serve": {"grounding": {"enabled": True, "domain_threshold": 0.95}}})
    with pytest.raises(ConfigError, match=r"serve\.grounding\.exact_treshold"):
        from_dict({"serve": {"grounding": {"exact_treshold": 0.8}}})
    assert not GroundingConfig().covers("faq")  # off by default
    assert ON.covers("faq") and ON.covers("other")
    only = GroundingConfig(enabled=True, adapters=["faq"])
    assert only.covers("faq") and not only.covers("other")


def test_grounded_adapter_names_are_checked_when_the_app_is_built(tmp_path, caplog):
    from serve.app import bind

    registry = tmp_path / "registry"
    (registry / "adapters" / "faq").mkdir(parents=True)
    (registry / "adapters" / "faq" / "manifest.json").write_text(json.dumps({"base_model": "microsoft/phi-2"}))

    def app(*names):
        grounding = {"enabled": True, "adapters": list(names)}
        return bind(from_dict({"run": {"registry": str(registry)}, "serve": {"grounding": grounding}}))

    with pytest.raises(ConfigError, match=r"serve\.grounding\.adapters: invalid adapter name '\.\./faq'"):
        app("faq", "../faq")
    with caplog.at_level("WARNING", logger="serve.app"):
        assert app("faq", "fqa") is not None
    assert [r.getMessage() for r in caplog.records if "fqa" in r.getMessage()] == [
        f"serve.grounding.adapters: {registry} holds no adapter 'fqa'; its answers are grounded once one is "
        "registered under that name. Check the spelling: qlora-ray artifacts list"
    ]
    assert not any("'faq'" in r.getMessage() for r in caplog.records)
