"""Grounded answers: which path answers a question, and the Q&A set an adapter's manifest leads to."""

from __future__ import annotations

import asyncio
import json

import pytest
from adapters import FAQ, FAQ_HOLDOUT_FRACTION, write_faq

from qlora_ray.config import ConfigError, GroundingConfig, from_dict
from qlora_ray.registry import ADAPTER_CONFIG, dataset_entry
from serve.grounding import (
    DECLINED,
    MODEL,
    STORED,
    GroundingError,
    QASet,
    QASets,
    dataset_key,
    fit_answer,
    training_examples,
)

ON = GroundingConfig(enabled=True)


@pytest.fixture(scope="module")
def embedder():
    from qlora_ray.metrics import Similarity

    return Similarity()


def _asked(question: str) -> dict:
    return {"format": "prompt_completion", "prompt": question}


def _adapter_dir(tmp_path, data_path, name="adapter", holdout=FAQ_HOLDOUT_FRACTION):
    directory = tmp_path / name
    directory.mkdir()
    (directory / ADAPTER_CONFIG).write_text(
        f"data: {{path: {data_path}, format: prompt_completion, holdout_fraction: {holdout}}}\n"
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
    (registry / "adapters" / "faq" / "adapter_config.json").write_text("{}")  # files beside it: not a damaged one

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


def test_a_manifest_cannot_point_grounding_at_any_file_outside_the_registry_or_run_storage(tmp_path):
    registry, runs, elsewhere = tmp_path / "registry", tmp_path / "runs", tmp_path / "elsewhere"
    for place in (registry, runs, elsewhere):
        place.mkdir()
    trusted = (str(registry), str(runs))
    directory, manifest = _adapter_dir(registry, write_faq(elsewhere / "faq.jsonl"))
    assert len(training_examples(directory, manifest, trusted)) == len(FAQ) - 2  # fingerprinted: read anywhere
    unchecked = {"dataset": {"path": str(elsewhere / "faq.jsonl"), "format": "prompt_completion"}}
    outside = r"elsewhere/faq\.jsonl \(the manifest's dataset\.path\) is outside the registry and the run storage"
    with pytest.raises(GroundingError, match=rf"{outside} .*records no fingerprint"):
        training_examples(directory, unchecked, trusted)
    hub_named = {"dataset": {**unchecked["dataset"], "fingerprint": f"name:{elsewhere / 'faq.jsonl'}"}}
    with pytest.raises(GroundingError, match=outside):  # a local file is no hub dataset, whatever the manifest says
        training_examples(directory, hub_named, trusted)
    (registry / "link.jsonl").symlink_to(elsewhere / "faq.jsonl")  # inside by name, outside in fact
    with pytest.raises(GroundingError, match="is outside the registry"):
        training_examples(directory, {"dataset": {"path": str(registry / "link.jsonl")}}, trusted)
    for inside in (runs / "faq.jsonl", registry / "data" / "faq.jsonl"):  # no fingerprint needed where we keep data
        inside.parent.mkdir(exist_ok=True)
        write_faq(inside)
        assert len(training_examples(directory, {"dataset": {"path": str(inside)}}, trusted)) == len(FAQ) - 2
    assert training_examples(directory, unchecked, (f"file://{elsewhere}", "s3://bucket/runs"))  # a file:// root


def test_stored_answers_are_cut_to_the_requests_max_tokens_and_stop_strings(tiny_tokenizer):
    answer = "galaxy is a cloud store . hello world"
    assert fit_answer(answer, 100, (), tiny_tokenizer) == (answer, "stop", 8)
    assert fit_answer(answer, 3, (), tiny_tokenizer) == ("galaxy is a", "length", 3)
    assert fit_answer(answer, 100, ("cloud", "hello"), tiny_tokenizer) == ("galaxy is a ", "stop", 3)
    assert fit_answer(answer, 2, ("cloud",), tiny_tokenizer) == ("galaxy is", "length", 2)  # the stop comes later
    assert fit_answer(answer, 4, ("cloud",), tiny_tokenizer) == ("galaxy is a ", "stop", 3)
    assert fit_answer(answer, 8, ("galaxy",), tiny_tokenizer) == ("", "stop", 0)
    assert fit_answer("galaxy  is", 1, (), tiny_tokenizer) == ("galaxy", "length", 1)  # the answer's own text


def test_adapters_trained_on_the_same_data_and_split_share_a_key(tmp_path):
    data = write_faq(tmp_path / "faq.jsonl")
    one, manifest = _adapter_dir(tmp_path, data, "one")
    two, _ = _adapter_dir(tmp_path, data, "two")
    other_split, _ = _adapter_dir(tmp_path, data, "three", holdout=0.5)
    assert dataset_key(one, manifest) == dataset_key(two, manifest) != dataset_key(other_split, manifest)
    # The same bytes elsewhere (one copy may be gone, or outside the trusted locations): a key, and a failure,
    # of their own.
    copy = write_faq(tmp_path / "copy.jsonl")
    assert dataset_key(two, {"dataset": dataset_entry(str(copy), "prompt_completion")}) != dataset_key(one, manifest)
    (one / ADAPTER_CONFIG).unlink()
    assert dataset_key(one, manifest) != dataset_key(two, manifest)  # a plain adapter's failure is its own


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_q_and_a_sets_are_built_once_per_key_and_concurrent_requests_wait_for_that_build():
    builds = []

    def builder(key, delay=0.05):
        async def build():
            builds.append(key)
            await asyncio.sleep(delay)
            return f"set of {key}"

        return build

    async def main():
        sets = QASets()
        results = await asyncio.gather(*(sets.get(k, builder(k)) for k in ("a", "a", "b", "a")))
        assert results == ["set of a", "set of a", "set of b", "set of a"] and sorted(builds) == ["a", "b"]
        assert await sets.get("a", builder("a")) == "set of a" and len(builds) == 2  # built: reused
        # A request that goes away does not cancel the build the others wait for.
        gone = asyncio.ensure_future(sets.get("c", builder("c", delay=0.2)))
        staying = asyncio.ensure_future(sets.get("c", builder("c")))
        await asyncio.sleep(0.05)
        gone.cancel()
        assert await staying == "set of c" and builds.count("c") == 1
        sets.keep({"a"})
        assert set(sets.built) == {"a"}

    asyncio.run(main())


def test_a_failed_build_is_answered_with_its_error_until_the_retry_time():
    clock, calls = _Clock(), []

    async def failing():
        calls.append(clock.now)
        await asyncio.sleep(0)
        raise GroundingError("its training data lost.jsonl is not on this replica")

    async def main():
        sets = QASets(retry_s=60, clock=clock)
        answers = await asyncio.gather(*(sets.get("k", failing) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(a, GroundingError) for a in answers) and calls == [0.0]  # one build, three answers
        clock.now = 59.0
        with pytest.raises(GroundingError, match=r"lost\.jsonl"):
            await sets.get("k", failing)
        assert calls == [0.0]  # remembered: not built again
        clock.now = 60.0
        with pytest.raises(GroundingError):
            await sets.get("k", failing)
        assert calls == [0.0, 60.0]  # tried again after the retry time

    asyncio.run(main())
