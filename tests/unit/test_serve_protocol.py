"""The Serve app's pieces that need no cluster: request validation, error shape, keys, app arguments, prompts."""

from __future__ import annotations

import json
import pickle

import pytest
from pydantic import ValidationError

from data.templates import build_prompt, example_from_messages, messages_for
from qlora_ray.config import ConfigError, from_dict
from serve.app import build_app
from serve.auth import KEYS_VARIABLE, accepts, api_keys, is_loopback, key_hashes
from serve.protocol import (
    IGNORED,
    REFUSED,
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_messages,
    check_limits,
    error_from_validation,
    lone_surrogate_at,
    refuse_unsupported,
)


def test_requests_take_openai_fields_and_null_means_the_default():
    request = CompletionRequest.model_validate({"prompt": ["one"], "stop": "###", "unknown_field": 1})
    assert (request.prompt, request.stop, request.temperature, request.model) == ("one", ["###"], None, None)
    nulls = {"prompt": "a", "temperature": None, "top_p": None, "n": None, "stop": None, "stream": None,
             "max_tokens": None, "seed": None, "stream_options": None, "user": None}  # fmt: skip
    request = CompletionRequest.model_validate(nulls)
    assert (request.stop, request.n, request.stream) == ([], None, None)
    for bad in ({"prompt": ["a", "b"]}, {"prompt": "a", "stop": ["1", ""]}, {"prompt": "a", "n": 0},
                {"prompt": "a", "top_p": 0}, {"prompt": "a", "max_tokens": 0}):  # fmt: skip
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"messages": []})


def test_chat_messages_take_content_parts_and_the_developer_role():
    request = ChatRequest.model_validate({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there?"}]},
        {"role": "assistant", "content": None}, {"role": "user", "content": "And?"},
    ]})  # fmt: skip
    assert chat_messages(request.messages) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere?"},
        {"role": "assistant", "content": ""}, {"role": "user", "content": "And?"},
    ]  # fmt: skip
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    for messages, param in (([{"role": "user", "content": [image]}], "messages.0.content"),
                            ([{"role": "tool", "content": "42"}], "messages.0.role"),
                            ([{"role": "user", "content": [{"type": "text"}]}], "messages.0.content")):  # fmt: skip
        with pytest.raises(ApiError) as refused:
            chat_messages(ChatRequest.model_validate({"messages": messages}).messages)
        assert (refused.value.status, refused.value.param) == (400, param)


@pytest.mark.parametrize(
    "field", [("logprobs", True), ("top_logprobs", 2), ("logit_bias", {"50256": -100}), ("presence_penalty", 0.5),
              ("frequency_penalty", 1), ("tools", [{"type": "function"}]), ("tool_choice", "auto"),
              ("response_format", {"type": "json_object"}), ("echo", True), ("best_of", 3), ("suffix", "end"),
              ("modalities", ["text", "audio"])],
)  # fmt: skip
def test_fields_that_would_change_the_answer_are_refused_unless_at_their_no_op_value(field):
    name, value = field
    with pytest.raises(ApiError) as refused:
        refuse_unsupported({"prompt": "a", name: value})
    assert (refused.value.status, refused.value.param) == (400, name) and "not supported" in refused.value.message
    assert name in REFUSED


def test_no_op_values_of_refused_fields_and_ignored_fields_pass():
    refuse_unsupported({"logprobs": False, "top_logprobs": 0, "logit_bias": {}, "presence_penalty": 0, "tools": [],
                        "tool_choice": "none", "response_format": {"type": "text"}, "echo": False, "best_of": 1,
                        "suffix": None, "modalities": ["text"], **dict.fromkeys(IGNORED, "x")})  # fmt: skip


def test_a_lone_surrogate_is_found_wherever_it_is():
    broken = json.loads('{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "a\\ud800"}]}')
    assert lone_surrogate_at(broken) == "messages.1.content"
    assert lone_surrogate_at(json.loads('{"stop": ["\\udfff"]}')) == "stop.0"
    assert lone_surrogate_at({"prompt": "caf\u00e9 \U0001f600", "n": 1}) is None


def test_request_limits_name_their_setting():
    limits = from_dict({"data": {"path": "x.jsonl"}, "serve": {"max_messages": 2, "max_message_chars": 5,
                        "max_stop_strings": 1, "max_stop_chars": 3, "max_choices": 2}}).serve  # fmt: skip
    check_limits({"prompt": "12345"}, ["abc"], 2, limits)
    for args, kwargs, setting in (
        (({"prompt": "123456"}, [], 1), {}, "serve.max_message_chars"),
        (({"messages.0.content": "a"}, [], 1), {"messages": 3}, "serve.max_messages"),
        (({"prompt": "a"}, ["a", "b"], 1), {}, "serve.max_stop_strings"),
        (({"prompt": "a"}, ["abcd"], 1), {}, "serve.max_stop_chars"),
        (({"prompt": "a"}, [], 3), {}, "serve.max_choices"),
    ):
        with pytest.raises(ApiError, match=setting.replace(".", r"\.")) as refused:
            check_limits(*args, limits, **kwargs)
        assert refused.value.status == 400


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


def _serve_cfg(**serve):
    return from_dict({"data": {"path": "x.jsonl"}, "serve": serve}).serve


def test_api_keys_from_file_and_variable_reach_replicas_as_hashes(tmp_path, monkeypatch):
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nk1\n\n  k2  \n")
    monkeypatch.setenv(KEYS_VARIABLE, "k3, k4,")
    cfg = _serve_cfg(api_keys_file=str(keys))
    assert api_keys(cfg) == {"k1", "k2", "k3", "k4"}
    hashes = key_hashes(cfg)
    assert len(hashes) == 4 and not {"k1", "k2", "k3", "k4"} & set(hashes)
    assert accepts(hashes, "Bearer k3") and accepts(hashes, "bearer  k1 ") and accepts(hashes, "Bearer k5") is False
    assert accepts(hashes, "k3") is None and accepts(hashes, "Basic k3") is None and accepts(hashes, "Bearer ") is None
    monkeypatch.delenv(KEYS_VARIABLE)
    assert key_hashes(_serve_cfg()) == []


def test_a_key_source_without_keys_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv(KEYS_VARIABLE, raising=False)
    for text in ("", "# only a comment\n\n   \n"):
        (tmp_path / "keys.txt").write_text(text)
        with pytest.raises(ConfigError, match=r"serve\.api_keys_file: .*holds no key"):
            key_hashes(_serve_cfg(api_keys_file=str(tmp_path / "keys.txt")))
    monkeypatch.setenv(KEYS_VARIABLE, " , ")
    with pytest.raises(ConfigError, match=f"{KEYS_VARIABLE} is set but holds no key"):
        key_hashes(_serve_cfg())


def test_keys_no_client_could_send_refuse_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv(KEYS_VARIABLE, raising=False)
    for line in ("k1 # the build server's key", "cl\u00e9"):
        (tmp_path / "keys.txt").write_text(line + "\n")
        with pytest.raises(ConfigError, match="printable ASCII"):
            key_hashes(_serve_cfg(api_keys_file=str(tmp_path / "keys.txt")))


def test_a_reachable_host_without_keys_refuses_unless_allowed(monkeypatch, caplog):
    monkeypatch.delenv(KEYS_VARIABLE, raising=False)
    assert is_loopback("::ffff:127.0.0.1") and not is_loopback("::ffff:10.0.0.1")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert key_hashes(_serve_cfg(host=host)) == []
    for host in ("0.0.0.0", "10.1.2.3", "::", "my-host.example"):
        with pytest.raises(ConfigError, match=r"serve\.allow_unauthenticated"):
            key_hashes(_serve_cfg(host=host))
    with caplog.at_level("WARNING"):
        assert key_hashes(_serve_cfg(host="0.0.0.0", allow_unauthenticated=True)) == []
    assert "without API keys" in caplog.text
    monkeypatch.setenv(KEYS_VARIABLE, "k1")
    assert len(key_hashes(_serve_cfg(host="0.0.0.0"))) == 1


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
