"""The OpenAI-compatible wire format: request bodies, response and stream chunk objects, errors.

Requests are validated here (unknown fields are ignored, as OpenAI's own server does, but unsupported values
of known fields are refused). Errors travel as :class:`ApiError` and leave the server in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered to the client with its HTTP status, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def __reduce__(self) -> tuple[Any, ...]:  # raised in a replica, caught in the ingress: must pickle
        return (ApiError, (self.status, self.message, self.param, self.code))

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = Field(None, description="End the stream with a chunk that carries the usage counts.")


class _Request(BaseModel):
    """The fields both endpoints honour; ``null`` is the default, as for OpenAI's own server."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Adapter name; unset: the server's default adapter.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, description="Choices to generate (at most serve.max_choices).")
    seed: int | None = Field(None, description="Sampling seed: the same request and seed give the same text.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string)")
            value = value[0]
        return value


class Message(BaseModel):
    """A chat message as sent; :func:`chat_messages` turns it into ``{"role", "content"}`` text."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[Any] | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# Fields that would change the answer and that this server does not implement: a request that sets one to
# anything but its no-op value is refused with a 400 instead of being answered as if it had not.
_NO_OP: dict[str, Any] = {
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "echo": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "web_search_options": lambda v: v is None,
}
REFUSED = tuple(_NO_OP)
# Accepted and ignored: none of them changes the text of an answer.
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction", "reasoning_effort")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def refuse_unsupported(data: dict[str, Any]) -> None:
    """A 400 for the first field set to a value the server would not honour."""
    for name, no_op in _NO_OP.items():
        if name in data and not no_op(data[name]):
            raise ApiError(400, f"{name} is not supported by this server; remove it from the request (the README's "
                           "serving section lists what is honoured, ignored and refused)", param=name,
                           code="unsupported_parameter")  # fmt: skip


def lone_surrogate_at(data: Any, where: str = "") -> str | None:
    """The place of the first string in ``data`` that is not valid Unicode (a lone UTF-16 surrogate)."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = lone_surrogate_at(key, where) if isinstance(key, str) else None
        found = found or lone_surrogate_at(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def _text_of(content: str | list[Any] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}.content.{j} is a {kind!r} part; this server takes text only "
                           "(parts of type 'text' with a 'text' string)", param=f"{where}.content")  # fmt: skip
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(messages: list[Message]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` messages: text parts joined, ``developer`` as ``system``; others a 400."""
    plain = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if message.role not in ROLES:
            raise ApiError(400, f"{where}.role is {message.role!r}; this server takes system, developer, user and "
                           "assistant messages (no tools)", param=f"{where}.role")  # fmt: skip
        plain.append({"role": ROLES[message.role], "content": _text_of(message.content, where)})
    return plain


def check_limits(texts: dict[str, str], stops: list[str], n: int, limits: Any, messages: int = 0) -> None:
    """The request-size limits of ``serve`` (``limits``), each a 400 naming its setting, before any tokenising.

    ``texts`` maps where each text is (``prompt``, ``messages.0.content``) to the text.
    """
    if messages > limits.max_messages:
        raise ApiError(400, f"the request has {messages} messages; this server takes at most {limits.max_messages} "
                       "(serve.max_messages)", param="messages")  # fmt: skip
    for where, text in texts.items():
        if len(text) > limits.max_message_chars:
            limit = limits.max_message_chars
            raise ApiError(400, f"{where} has {len(text)} characters; this server takes at most {limit} per message "
                           "(serve.max_message_chars)", param=where)  # fmt: skip
    if len(stops) > limits.max_stop_strings:
        raise ApiError(400, f"the request has {len(stops)} stop strings; this server takes at most "
                       f"{limits.max_stop_strings} (serve.max_stop_strings)", param="stop")  # fmt: skip
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise ApiError(400, f"a stop string is longer than {limits.max_stop_chars} characters "
                       "(serve.max_stop_chars)", param="stop")  # fmt: skip
    if n > limits.max_choices:
        raise ApiError(400, f"n is {n}; this server returns at most {limits.max_choices} choices per request "
                       "(serve.max_choices)", param="n")  # fmt: skip


def error_from_validation(errors: list[dict[str, Any]]) -> ApiError:
    """A 422 naming every field that failed validation and why."""
    problems = []
    for err in errors:
        where = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    first = ".".join(str(p) for p in errors[0].get("loc", ()) if p != "body") if errors else None
    return ApiError(422, "invalid request: " + "; ".join(problems), param=first or None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


Choice = tuple[int, str, "str | None"]  # (index, text, finish_reason)


def completion_object(
    rid: str, model: str, choices: list[Choice], stream: bool, counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """A ``text_completion`` (whole, or one stream chunk)."""
    body: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                    for i, text, finish in choices],
    }  # fmt: skip
    if not stream:
        body["usage"] = counts
    return body


def chat_object(
    rid: str, model: str, choices: list[Choice], stream: bool, counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """A ``chat.completion``, or a ``chat.completion.chunk`` when streaming."""
    if stream:
        deltas = [{"index": i, "delta": {"role": "assistant", "content": text}, "finish_reason": finish,
                   "logprobs": None} for i, text, finish in choices]  # fmt: skip
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": deltas}  # fmt: skip
    whole = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
              "logprobs": None} for i, text, finish in choices]  # fmt: skip
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": whole, "usage": counts}  # fmt: skip


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line: ``data: <json>`` (or ``data: [DONE]``)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
