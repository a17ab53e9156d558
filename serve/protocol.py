"""The OpenAI-compatible wire format: request bodies, response and stream chunk objects, errors.

Requests are validated here (unknown fields are ignored, as OpenAI's own server does, but unsupported values
of known fields are refused). Errors travel as :class:`ApiError` and leave the server in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
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

    include_usage: bool = Field(False, description="End the stream with a chunk that carries the usage counts.")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Adapter name; unset: the server's default adapter.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="One choice per request.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
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
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


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


def completion_object(
    rid: str, model: str, text: str, finish: str | None, stream: bool, counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """A ``text_completion`` (whole, or one stream chunk)."""
    body: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }  # fmt: skip
    if not stream:
        body["usage"] = counts
    return body


def chat_object(
    rid: str, model: str, text: str, finish: str | None, stream: bool, counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """A ``chat.completion``, or a ``chat.completion.chunk`` when streaming."""
    if stream:
        choice = {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [choice]}  # fmt: skip
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": counts}  # fmt: skip


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line: ``data: <json>`` (or ``data: [DONE]``)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
