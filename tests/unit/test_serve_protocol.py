"""The Serve app's pieces that need no cluster: request validation, error shape, keys, app arguments, prompts."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from data.templates import build_prompt, example_from_messages, messages_for
from qlora_ray.config import ConfigError, from_dict
from serve.app import KEYS_VARIABLE, api_keys, build_app
from serve.protocol import ApiError, ChatRequest, CompletionRequest, error_from_validation


def test_requests_take_openai_fields_and_refuse_what_is_not_supported():
    request = CompletionRequest.model_validate({"prompt": ["one"], "stop": "###", "unknown_field": 1})
    assert (request.prompt, request.stop, request.temperature, request.model) == ("one", ["###"], 1.0, None)
    for bad in ({"prompt": ["a", "b"]}, {"prompt": "a", "n": 2}, {"prompt": "a", "stop": ["1", "2", "3", "4", "5"]},
                {"prompt": "a", "top_p": 0}, {"prompt": "a", "max_tokens": 0}):  # fmt: skip
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"messages": []})
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"messages": [{"role": "robot", "content": "hi"}]})


def test_validation_errors_name_every_field():
    try:
        CompletionRequest.model_validate({"temperature": 9})
    except ValidationError as err:
        failure = error_from_validation(err.errors())
    assert failure.status == 422 and "prompt: Field required" in failure.message and "temperature" in failure.message
    body = failure.body()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] in ("prompt", "temperature")


def test_api_errors_cross_process_boundaries_intact():
    err = pickle.loads(pickle.dumps(ApiError(404, "no adapter named 'x'", param="model", code="model_not_found")))
    assert (err.status, err.message, err.param, err.code) == (404, "no adapter named 'x'", "model", "model_not_found")


def test_api_keys_from_file_and_variable(tmp_path, monkeypatch):
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nk1\n\n  k2  \n")
    monkeypatch.setenv(KEYS_VARIABLE, "k3, k4,")
    cfg = from_dict({"data": {"path": "x.jsonl"}, "serve": {"api_keys_file": str(keys)}})
    assert api_keys(cfg) == {"k1", "k2", "k3", "k4"}
    monkeypatch.delenv(KEYS_VARIABLE)
    assert api_keys(from_dict({"data": {"path": "x.jsonl"}})) == set()


def test_app_arguments_are_checked(tmp_path):
    with pytest.raises(ValidationError, match="confg"):
        build_app({"confg": "configs/quickstart.yaml"})
    with pytest.raises(ConfigError, match="cannot read the file"):
        build_app({"config": str(tmp_path / "missing.yaml")})
    with pytest.raises(ConfigError, match=r"serve\.api_keys_file: .*none cannot be read"):
        build_app({"config": "configs/quickstart.yaml", "overrides": [f"serve.api_keys_file={tmp_path / 'none'}"]})


def test_chat_messages_become_the_prompt_the_adapter_was_trained_on():
    messages = [{"role": "system", "content": "Ray is a framework."}, {"role": "user", "content": "<RAY> What is Ray?"}]
    faq = example_from_messages(messages, "prompt_completion")
    assert build_prompt(faq, "") == "<RAY> What is Ray?"  # tags pass through as written
    qa = example_from_messages(messages, "context_qa")
    assert build_prompt(qa, "{context}\nQuestion: {question}\nAnswer:") == (
        "Ray is a framework.\nQuestion: <RAY> What is Ray?\nAnswer:"
    )
    with pytest.raises(ValueError, match="no user message"):
        example_from_messages(messages[:1], "prompt_completion")


def test_an_example_asked_as_chat_messages_gets_its_training_prompt_back():
    template = "{context}\nQuestion: {question}\nAnswer:"
    examples = [
        {"format": "prompt_completion", "prompt": "<GALAXY> Hi?", "completion": "Hello"},
        {"format": "context_qa", "question": "Yield?", "context": "The alloy yields at 2 GPa.", "completion": "2 GPa"},
        {"format": "alpaca", "question": "Summarise", "context": "", "completion": "ok"},
    ]
    for example in examples:
        asked = example_from_messages(messages_for(example), example["format"])
        assert build_prompt(asked, template) == build_prompt(example, template)


def test_serve_settings_that_cannot_work_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"max_ongoing_requests \(4\) is below max_batch_size \(8\)"):
        from_dict({"data": {"path": "x.jsonl"}, "serve": {"max_ongoing_requests": 4, "max_batch_size": 8}})
    with pytest.raises(ConfigError, match=r"min_replicas \(3\) is above max_replicas \(2\)"):
        from_dict({"data": {"path": "x.jsonl"}, "serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})


def test_an_adapter_saved_with_settings_the_schema_no_longer_has_still_serves_with_its_prompt_format(tmp_path):
    from qlora_ray.registry import ADAPTER_CONFIG
    from serve.generator import _prompt_settings

    (tmp_path / ADAPTER_CONFIG).write_text(
        "run: {name: old, local_dashboard: false}\ndata: {path: x.json, format: context_qa, template: 'C {context} Q {question}'}\n"
    )
    settings = _prompt_settings(tmp_path)
    assert (settings.format, settings.template) == ("context_qa", "C {context} Q {question}")
    (tmp_path / ADAPTER_CONFIG).write_text("data: {path: x.json, format: tweets}\n")
    with pytest.raises(ConfigError, match=r"(?s)data section does not validate.*tweets"):
        _prompt_settings(tmp_path)
