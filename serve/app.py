"""The Serve application: an OpenAI-compatible HTTP ingress in front of the generator deployment.

    serve run serve/config.yaml          # or: serve deploy serve/config.yaml, python -m serve --config PATH

``build_app`` reads the run config (``serve`` section) and binds two deployments:

- ``Api`` (this module): FastAPI routes ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
  ``/healthz`` and the chat page at ``/`` (``serve/static/``); API keys; OpenAI-shaped errors; the request
  timeout. It holds no model and imports no torch.
- ``Generator`` (``serve.generator``): the base model, the adapters and the batching, autoscaled.

The ingress resolves the request's ``model`` (an adapter name, or the registry's best) against the registry
and calls the generator with it as Serve's multiplexed model id, so requests for an adapter go to replicas
that have it loaded.
"""

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from qlora_ray import console
from qlora_ray.config import Config, ConfigError, from_dict, load_config, pin_local_paths
from qlora_ray.registry import Registry, RegistryError, base_key
from serve.generator import Generator
from serve.grounding import MODEL
from serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_object,
    completion_object,
    error_from_validation,
    new_id,
    sse,
    usage,
)

log = logging.getLogger("ray.serve")  # Serve writes it to the replica logs, with request ids
# No ``from __future__ import annotations`` here: Serve's ingress rebuilds the route signatures, and FastAPI must
# see real classes (Request, the request bodies), not strings, to tell a body from a query parameter.

KEYS_VARIABLE = "QLORA_RAY_API_KEYS"
STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}  # what /static/ serves, and nothing else
RETRY_AFTER_S = 1
ANSWER_SOURCE_HEADER = "x-answer-source"  # stored | model | declined

api = FastAPI(title="qlora-ray", description="OpenAI-compatible completions from fine-tuned LoRA adapters.")


@api.exception_handler(ApiError)
async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@api.exception_handler(Exception)
async def _unexpected(_request: Request, err: Exception) -> JSONResponse:
    log.exception("request failed")  # the traceback stays in the server log; the client gets the error's shape
    failure = ApiError(500, f"internal error ({type(err).__name__}); the server log has the details")
    return JSONResponse(failure.body(), status_code=500)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404) and wrong methods (405), in the same error shape as every other answer."""
    failure = ApiError(err.status_code, f"{err.detail}: see GET /v1/models, POST /v1/chat/completions, / for the chat")
    return JSONResponse(failure.body(), status_code=err.status_code, headers=getattr(err, "headers", None))


@api.exception_handler(RequestValidationError)
async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse(ApiError(400, "the request body is not valid JSON").body(), status_code=400)
    failure = error_from_validation(list(errors))
    return JSONResponse(failure.body(), status_code=failure.status)


def api_keys(cfg: Config) -> set[str]:
    """Accepted API keys: the lines of ``serve.api_keys_file`` and the comma-separated ``QLORA_RAY_API_KEYS``."""
    keys = {k.strip() for k in os.environ.get(KEYS_VARIABLE, "").split(",") if k.strip()}
    if cfg.serve.api_keys_file:
        path = Path(cfg.serve.api_keys_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise ApiError(500, f"serve.api_keys_file {path} cannot be read: {err.strerror}") from None
        keys |= {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    return keys


async def _first(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        raise ApiError(500, "the generator returned no output") from None


def _epoch(created: str | None) -> int:
    try:
        return int(datetime.fromisoformat(created).timestamp()) if created else 0
    except ValueError:
        return 0


# Serve serializes the class when this decorator runs: everything it uses must be defined above it.
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Api:
    """HTTP ingress: validation, auth, adapter resolution, streaming; the generator does the work."""

    def __init__(self, generator: DeploymentHandle, config: dict[str, Any]):
        console.setup_replica()
        self.cfg = from_dict(config, source="serve app")
        self.generator = generator
        self.registry = Registry(self.cfg.run.registry)
        self.keys = api_keys(self.cfg)
        self.base = self.cfg.model.name_or_path
        log.info("API ready: auth %s, registry %s", "on" if self.keys else "off", self.registry.location)

    @api.get("/")
    async def page(self) -> FileResponse:
        """The chat page (no auth: it asks for the key itself, and every API call it makes carries it)."""
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/static/{name}")
    async def static(self, name: str) -> FileResponse:
        if name not in PAGE_FILES:
            raise ApiError(404, f"no static file {name!r}")
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name])

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once a generator replica has its model loaded, else 503."""
        try:
            state = await asyncio.wait_for(self.generator.ready.remote(), timeout=5)
        except Exception as err:  # any failure means "not ready"
            return JSONResponse({"status": "starting", "detail": type(err).__name__}, status_code=503)
        return JSONResponse({"status": "ok", **state})

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        default = self._default_adapter(required=False)
        data = [
            {
                "id": entry.name, "object": "model", "created": _epoch(entry.manifest.get("created")),
                "owned_by": "qlora-ray", "root": self.base, "default": entry.name == default,
                "metrics": entry.manifest.get("metrics", {}),
            }
            for entry in self._servable()
        ]  # fmt: skip
        return {"object": "list", "data": data}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._authorize(request)
        return await self._respond(body, {"prompt": body.prompt}, completion_object, "cmpl")

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request) -> Any:
        self._authorize(request)
        messages = [m.model_dump() for m in body.messages]
        return await self._respond(body, {"messages": messages}, chat_object, "chatcmpl")

    # Request handling

    async def _respond(self, body: Any, prompt: dict[str, Any], shape: Any, prefix: str) -> Any:
        name = self._adapter(body.model)
        job = {**prompt, "sampling": self._sampling(body)}
        rid = new_id(prefix)
        deadline = time.monotonic() + self.cfg.serve.request_timeout_s
        chunks = self._chunks(name, job, deadline)
        first = await _first(chunks)  # errors before the first token become HTTP errors
        source = first.get("source", MODEL)  # which path answers (serve.grounding): a header and a body field
        headers = {ANSWER_SOURCE_HEADER: source}

        def sourced(*args: Any) -> dict[str, Any]:
            return {**shape(*args), "answer_source": source}

        if body.stream:
            with_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._events(rid, name, first, chunks, sourced, with_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        text, last = first["text"], first
        async for chunk in chunks:
            text, last = text + chunk["text"], chunk
        log.info("%s %s: %d prompt + %d completion tokens", rid, name, last["prompt_tokens"], last["completion_tokens"])
        counts = usage(last["prompt_tokens"], last["completion_tokens"])
        return JSONResponse(sourced(rid, name, text, last["finish_reason"], False, counts), headers=headers)

    async def _events(
        self,
        rid: str,
        name: str,
        first: dict[str, Any],
        chunks: AsyncIterator[dict[str, Any]],
        shape: Any,
        with_usage: bool,
    ) -> AsyncIterator[str]:
        """Server-sent events: one chunk object per delta (and the usage if asked), then ``data: [DONE]``.

        An error after the first chunk (the status line is sent by then) ends the stream with an error event.
        """
        last = first
        try:
            yield sse(shape(rid, name, first["text"], first["finish_reason"], True))
            async for last in chunks:
                if last["text"] or last["finish_reason"]:  # a step may add no text yet (a held-back partial word)
                    yield sse(shape(rid, name, last["text"], last["finish_reason"], True))
            log.info(
                "%s %s: %d prompt + %d completion tokens", rid, name, last["prompt_tokens"], last["completion_tokens"]
            )
            if with_usage:
                final = shape(rid, name, "", None, True)
                yield sse({**final, "choices": [], "usage": usage(last["prompt_tokens"], last["completion_tokens"])})
        except ApiError as err:
            yield sse(err.body())
        yield sse("[DONE]")

    async def _chunks(self, name: str, job: dict[str, Any], deadline: float) -> AsyncIterator[dict[str, Any]]:
        """The generator's chunks for one request, within the deadline; retried once if its replica died."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError
        from ray.serve.exceptions import BackPressureError

        for attempt in (1, 2):
            handle = self.generator.options(stream=True, multiplexed_model_id=name)
            stream = handle.generate.remote(job)
            sent = 0
            try:
                while True:
                    left = deadline - time.monotonic()
                    chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(left, 0.001))
                    sent += 1
                    yield chunk
            except StopAsyncIteration:
                return
            except TimeoutError:
                stream.cancel()
                raise ApiError(504, f"the request took longer than {self.cfg.serve.request_timeout_s:g} s "
                               "(serve.request_timeout_s); ask for fewer tokens or retry later") from None  # fmt: skip
            except BackPressureError:
                raise ApiError(503, "the server is at capacity; retry after a moment") from None
            except (ActorDiedError, ActorUnavailableError) as err:
                if sent or attempt == 2:
                    raise ApiError(
                        503, f"the replica serving this request stopped ({type(err).__name__}); retry"
                    ) from None
                log.warning("replica lost before the first token; retrying on another")

    def _sampling(self, body: Any) -> dict[str, Any]:
        limit = self.cfg.serve.max_new_tokens
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > limit:
            raise ApiError(400, f"max_tokens is {asked}; this server generates at most {limit} tokens per request "
                           "(serve.max_new_tokens). Ask for fewer.", param="max_tokens")  # fmt: skip
        return {"max_tokens": asked or min(self.cfg.serve.default_max_tokens, limit), "temperature": body.temperature,
                "top_p": body.top_p, "stop": tuple(body.stop or ())}  # fmt: skip

    # Adapters

    def _adapter(self, requested: str | None) -> str:
        """The adapter a request names (or the default), checked against the registry and the base model."""
        if requested is None:
            return self._default_adapter(required=True)
        try:
            entry = self.registry.get(requested)
        except RegistryError as err:
            raise ApiError(404, str(err), param="model", code="model_not_found") from None
        trained_on = entry.manifest.get("base_model", "")
        if base_key(trained_on) != base_key(self.base):
            raise ApiError(404, f"adapter {requested!r} was trained on {trained_on}; this server serves {self.base}",
                           param="model", code="model_not_found")  # fmt: skip
        return entry.name

    def _default_adapter(self, required: bool) -> str | None:
        if self.cfg.serve.default_adapter:
            return self.cfg.serve.default_adapter
        best = self.registry.best(self.base)
        if best is None and required:
            raise ApiError(
                404, f"no adapter is registered for {self.base} in {self.registry.location}: train one, or name "
                "one in the request's model field", param="model", code="model_not_found",
            )  # fmt: skip
        return best.name if best else None

    def _servable(self) -> list[Any]:
        return [e for e in self.registry.list() if base_key(e.manifest.get("base_model", "")) == base_key(self.base)]

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in self.keys):
            raise ApiError(401, "invalid API key", code="invalid_api_key")


class AppArgs(BaseModel):
    """Arguments of ``serve.app:build_app`` (the ``args`` of an application in ``serve/config.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field("configs/quickstart.yaml", description="Run config YAML; its serve section shapes the app.")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides, e.g. serve.max_batch_size=8.")


def build_app(args: AppArgs) -> Any:
    """The Serve application for ``serve run`` / ``serve deploy``; Serve validates ``args`` as :class:`AppArgs`."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)  # called directly with a dict
    return bind(load_config(args.config, args.overrides))


def _check_grounded_names(cfg: Config) -> None:
    """``serve.grounding.adapters``: a name no adapter can have is an error; one not registered (yet) a warning."""
    registry = Registry(cfg.run.registry)
    for name in cfg.serve.grounding.adapters:
        try:
            found = registry.find(name)
        except RegistryError as err:
            raise ConfigError("of the Serve app", [f"serve.grounding.adapters: {err}"]) from None
        if found is None:
            logging.getLogger(__name__).warning(
                "serve.grounding.adapters: %s holds no adapter %r; its answers are grounded once one is registered "
                "under that name. Check the spelling: qlora-ray artifacts list", registry.location, name,
            )  # fmt: skip


def bind(cfg: Config) -> Any:
    """Both deployments, sized from ``cfg.serve``, bound into one application."""
    cfg = pin_local_paths(cfg)
    s = cfg.serve
    if s.api_keys_file and not os.access(s.api_keys_file, os.R_OK):
        problem = f"serve.api_keys_file: {s.api_keys_file} cannot be read; create it (one key per line) or unset it"
        raise ConfigError("of the Serve app", [problem])
    if s.grounding.enabled:
        from qlora_ray.metrics import similarity_model_dir

        try:
            similarity_model_dir()
        except RuntimeError as err:
            raise ConfigError("of the Serve app", [f"serve.grounding: {err}"]) from None
        _check_grounded_names(cfg)
    most = s.autoscaling.max_replicas if s.autoscaling else s.num_replicas
    resources: dict[str, Any] = {"num_cpus": s.cpus_per_replica}
    if s.gpus_per_replica:
        resources["num_gpus"] = s.gpus_per_replica
    scaling: dict[str, Any] = (
        {"autoscaling_config": s.autoscaling.model_dump()} if s.autoscaling else {"num_replicas": s.num_replicas}
    )
    generator = serve.deployment(Generator).options(
        ray_actor_options=resources,
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        health_check_period_s=5,
        **scaling,
    )
    # The ingress holds every request the generators may hold, plus health and listing calls; the bounded
    # queue that answers 503 is the generators' (serve.max_queued_requests), where requests wait for compute.
    room = most * s.max_ongoing_requests + s.max_queued_requests + 16
    ingress = Api.options(max_ongoing_requests=room, max_queued_requests=room)
    config = json.loads(json.dumps(cfg.model_dump()))  # plain data across the process boundary
    return ingress.bind(generator.bind(config), config)
