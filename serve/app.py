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
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from qlora_ray import console
from qlora_ray.config import Config, ConfigError, from_dict, load_config, pin_local_paths
from qlora_ray.registry import Registry, RegistryError, base_key, validate_name
from serve import auth
from serve.generator import Generator
from serve.grounding import MODEL
from serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_messages,
    chat_object,
    check_limits,
    completion_object,
    error_from_validation,
    lone_surrogate_at,
    new_id,
    refuse_unsupported,
    sse,
    usage,
)

log = logging.getLogger("ray.serve")  # Serve writes it to the replica logs, with request ids
# No ``from __future__ import annotations`` here: Serve's ingress rebuilds the route signatures, and FastAPI must
# see real classes (Request, the request bodies), not strings, to tell a body from a query parameter.

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}  # what /static/ serves, and nothing else
RETRY_AFTER_S = 1
ANSWER_SOURCE_HEADER = "x-answer-source"  # stored | model | declined

HEALTH_CHECK_S = 1.0  # how old the generator check behind a keyless /healthz may be
PARSE_ON_THREAD_BYTES = 64 * 1024  # a body this large is parsed off the ingress's event loop

# No generated docs: /docs, /redoc and /openapi.json would describe the API to anyone, key or not.
api = FastAPI(title="qlora-ray", docs_url=None, redoc_url=None, openapi_url=None)


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


async def _first(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        raise ApiError(500, "the generator returned no output") from None


def _epoch(created: str | None) -> int:
    try:
        return int(datetime.fromisoformat(created).timestamp()) if created else 0
    except (TypeError, ValueError):  # a hand-edited manifest: the entry is still listed
        return 0


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, at most ``limit`` bytes (else 413) and within ``timeout_s`` (else 408)."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is over {limit} bytes (serve.max_body_bytes); send less",
                         code="request_too_large")  # fmt: skip
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise too_large
                parts.append(part)
    except ClientDisconnect:
        raise ApiError(400, "the client went away before its request body arrived") from None
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s (serve.body_timeout_s)",
                       code="request_timeout") from None  # fmt: skip
    return b"".join(parts)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise ApiError(400, "the request body is not valid JSON") from None


async def _rest(first: dict[str, Any], chunks: AsyncIterator[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """A choice's whole text and its last chunk (which carries the counts and the finish reason)."""
    text, last = first["text"], first
    async for last in chunks:
        text += last["text"]
    return text, last


async def _all_or_none(work: list[Any]) -> list[Any]:
    """Run coroutines together; when one fails, cancel the rest (their streams stop generating) and raise."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _usage(rid: str, name: str, lasts: list[dict[str, Any]]) -> dict[str, int]:
    """The usage of a request's choices (the prompt counted once, as OpenAI does), logged without the text."""
    prompt, completion = lasts[0]["prompt_tokens"], sum(last["completion_tokens"] for last in lasts)
    log.info("%s %s: %d prompt + %d completion tokens", rid, name, prompt, completion)
    return usage(prompt, completion)


async def _merge(streams: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """``(choice, chunk)`` from every stream as each arrives; the first error ends them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk))
        except Exception as err:  # handed to the reader, which raises it
            await queue.put((i, err))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


# Serve serializes the class when this decorator runs: everything it uses must be defined above it.
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Api:
    """HTTP ingress: auth, validation, limits, adapter resolution, streaming; the generator does the work.

    Routes read their own bodies, after the key check: a request without a valid key is answered 401 before
    a byte of its body is read, however large.
    """

    def __init__(self, generator: DeploymentHandle, config: dict[str, Any], key_hashes: list[str]):
        console.setup_replica()
        self.cfg = from_dict(config, source="serve app")
        self.generator = generator
        self.registry = Registry(self.cfg.run.registry)
        self.key_hashes = list(key_hashes)
        self.base = self.cfg.model.name_or_path
        self.health: tuple[float, bool] | None = None  # (when, ready) of the last check, for keyless /healthz
        self.health_check: asyncio.Task | None = None
        auth_state = f"on ({len(self.key_hashes)} keys)" if self.key_hashes else "off"
        log.info("API ready: auth %s, registry %s", auth_state, self.registry.location)

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
    async def healthz(self, request: Request) -> JSONResponse:
        """200 once a generator replica has its model loaded, else 503; the replica's state only with a key.

        Without a key (when keys are set) the answer comes from a check made at most once a second, so that
        polling it costs the generators nothing."""
        if self.key_hashes and not auth.accepts(self.key_hashes, request.headers.get("authorization", "")):
            if await self._ready_recently():
                return JSONResponse({"status": "ok"})
            return JSONResponse({"status": "starting"}, status_code=503)
        state = await self._ready()
        if state is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok", **state})

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": await asyncio.to_thread(self._listing)}

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        entry = await asyncio.to_thread(self._entry, model_id)
        return self._model(entry, await asyncio.to_thread(self._default_adapter, False))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        self._authorize(request)
        body = await self._body(request, CompletionRequest)
        check_limits({"prompt": body.prompt}, body.stop, body.n or 1, self.cfg.serve)
        return await self._respond(body, {"prompt": body.prompt}, completion_object, "cmpl")

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        self._authorize(request)
        body = await self._body(request, ChatRequest)
        messages = chat_messages(body.messages)
        texts = {f"messages.{i}.content": m["content"] for i, m in enumerate(messages)}
        check_limits(texts, body.stop, body.n or 1, self.cfg.serve, messages=len(messages))
        return await self._respond(body, {"messages": messages}, chat_object, "chatcmpl")

    # Request handling

    async def _body(self, request: Request, kind: type[BaseModel]) -> Any:
        """The request body as ``kind``: size and time limits, JSON, Unicode, refused fields, then the fields."""
        s = self.cfg.serve
        raw = await read_body(request, s.max_body_bytes, s.body_timeout_s)
        large = len(raw) > PARSE_ON_THREAD_BYTES
        data = await asyncio.to_thread(_parse_json, raw) if large else _parse_json(raw)
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        where = await asyncio.to_thread(lone_surrogate_at, data) if large else lone_surrogate_at(data)
        if where:
            raise ApiError(400, f"{where} holds a lone UTF-16 surrogate, which is not text; send valid Unicode",
                           param=where)  # fmt: skip
        refuse_unsupported(data)
        try:
            return kind.model_validate(data)
        except ValidationError as err:
            raise error_from_validation(list(err.errors())) from None

    async def _respond(self, body: Any, prompt: dict[str, Any], shape: Any, prefix: str) -> Any:
        name = await asyncio.to_thread(self._adapter, body.model)  # registry reads: off the loop that relays streams
        rid = new_id(prefix)
        deadline = time.monotonic() + self.cfg.serve.request_timeout_s
        streams = [self._chunks(name, {**prompt, "sampling": self._sampling(body, i)}, deadline)
                   for i in range(body.n or 1)]  # fmt: skip
        firsts = await asyncio.gather(*(_first(s) for s in streams), return_exceptions=True)
        failed = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failed is not None:  # errors before the first token become HTTP errors
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise failed
        source = firsts[0].get("source", MODEL)  # which path answers (serve.grounding): a header and a body field
        headers = {ANSWER_SOURCE_HEADER: source}

        def sourced(*args: Any) -> dict[str, Any]:
            return {**shape(*args), "answer_source": source}

        if body.stream:
            with_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._events(rid, name, firsts, streams, sourced, with_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        wholes = await _all_or_none([_rest(f, s) for f, s in zip(firsts, streams, strict=True)])
        counts = _usage(rid, name, [last for _, last in wholes])
        choices = [(i, text, last["finish_reason"]) for i, (text, last) in enumerate(wholes)]
        return JSONResponse(sourced(rid, name, choices, False, counts), headers=headers)

    async def _events(
        self,
        rid: str,
        name: str,
        firsts: list[dict[str, Any]],
        streams: list[AsyncIterator[dict[str, Any]]],
        shape: Any,
        with_usage: bool,
    ) -> AsyncIterator[str]:
        """Server-sent events: one chunk object per delta of a choice (and the usage if asked), then ``[DONE]``.

        An error after the first chunk (the status line is sent by then) ends the stream with an error event.
        """
        lasts = list(firsts)
        merged = _merge(streams)
        try:
            for i, first in enumerate(firsts):
                yield sse(shape(rid, name, [(i, first["text"], first["finish_reason"])], True))
            async for i, chunk in merged:
                lasts[i] = chunk
                if chunk["text"] or chunk["finish_reason"]:  # a step may add no text yet (a held-back partial word)
                    yield sse(shape(rid, name, [(i, chunk["text"], chunk["finish_reason"])], True))
            counts = _usage(rid, name, lasts)
            if with_usage:
                yield sse({**shape(rid, name, [], True), "usage": counts})
        except ApiError as err:
            yield sse(err.body())
        finally:
            await merged.aclose()
        yield sse("[DONE]")

    async def _chunks(self, name: str, job: dict[str, Any], deadline: float) -> AsyncIterator[dict[str, Any]]:
        """The generator's chunks for one request, within the deadline; retried once if its replica died."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError
        from ray.serve.exceptions import BackPressureError

        for attempt in (1, 2):
            handle = self.generator.options(stream=True, multiplexed_model_id=name)
            stream = handle.generate.remote(job)
            sent, live = 0, True  # live: the replica may still be generating for this stream
            try:
                while True:
                    left = deadline - time.monotonic()
                    chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(left, 0.001))
                    sent += 1
                    yield chunk
            except StopAsyncIteration:
                live = False
                return
            except TimeoutError:
                raise ApiError(504, f"the request took longer than {self.cfg.serve.request_timeout_s:g} s "
                               "(serve.request_timeout_s); ask for fewer tokens or retry later") from None  # fmt: skip
            except BackPressureError:
                live = False
                raise ApiError(503, "the server is at capacity; retry after a moment") from None
            except (ActorDiedError, ActorUnavailableError) as err:
                live = False
                if sent or attempt == 2:
                    raise ApiError(
                        503, f"the replica serving this request stopped ({type(err).__name__}); retry"
                    ) from None
                log.warning("replica lost before the first token; retrying on another")
            except ApiError:
                live = False
                raise
            finally:
                if live:  # left early (timeout, a failed sibling choice, a client gone): stop generating
                    stream.cancel()

    def _sampling(self, body: Any, choice: int) -> dict[str, Any]:
        limit = self.cfg.serve.max_new_tokens
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        asked = getattr(body, field)
        if asked is not None and asked > limit:
            raise ApiError(400, f"{field} is {asked}; this server generates at most {limit} tokens per request "
                           "(serve.max_new_tokens). Ask for fewer.", param=field)  # fmt: skip
        return {
            "max_tokens": asked or min(self.cfg.serve.default_max_tokens, limit),
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "stop": tuple(body.stop),
            # n choices: n different draws; any integer is a seed (torch takes 64 bits)
            "seed": None if body.seed is None else (body.seed + choice) % 2**64,
        }

    async def _ready(self) -> dict[str, Any] | None:
        """A generator replica's state, or None when none answers (yet)."""
        try:
            return await asyncio.wait_for(self.generator.ready.remote(), timeout=5)
        except Exception:  # any failure means "not ready"
            return None

    async def _ready_recently(self) -> bool:
        """Whether a generator was ready at the last check, made again (one at a time) once it is a second old."""
        if self.health is None or time.monotonic() - self.health[0] > HEALTH_CHECK_S:
            if self.health_check is None or self.health_check.done():
                self.health_check = asyncio.create_task(self._ready())
            state = await asyncio.shield(self.health_check)
            self.health = (time.monotonic(), state is not None)
        return self.health[1]

    def _listing(self) -> list[dict[str, Any]]:
        default = self._default_adapter(required=False)
        return [self._model(entry, default) for entry in self._servable()]

    def _model(self, entry: Any, default: str | None) -> dict[str, Any]:
        manifest = entry.manifest
        return {"id": entry.name, "object": "model", "created": _epoch(manifest.get("created")),
                "owned_by": "qlora-ray", "root": self.base, "default": entry.name == default,
                "metrics": manifest.get("metrics", {})}  # fmt: skip

    # Adapters

    def _adapter(self, requested: str | None) -> str:
        """The adapter a request names (or the default), checked against the registry and the base model."""
        return self._default_adapter(required=True) if requested is None else self._entry(requested).name

    def _entry(self, name: str) -> Any:
        try:
            entry = self.registry.get(name)
        except RegistryError as err:
            raise ApiError(404, str(err), param="model", code="model_not_found") from None
        trained_on = entry.manifest.get("base_model", "")
        if base_key(trained_on) != base_key(self.base):
            raise ApiError(404, f"adapter {name!r} was trained on another base model than this server's",
                           param="model", code="model_not_found")  # fmt: skip
        return entry

    def _default_adapter(self, required: bool) -> str | None:
        if self.cfg.serve.default_adapter:
            return self.cfg.serve.default_adapter
        best = self.registry.best(self.base)
        if best is None and required:
            raise ApiError(
                404, "no adapter is registered for this server's base model: train one, or name one in the "
                "request's model field", param="model", code="model_not_found",
            )  # fmt: skip
        return best.name if best else None

    def _servable(self) -> list[Any]:
        return [e for e in self.registry.list() if base_key(e.manifest.get("base_model", "")) == base_key(self.base)]

    def _authorize(self, request: Request) -> None:
        if not self.key_hashes:
            # Without keys, answer only this machine unless told otherwise: Serve's proxy may listen on another
            # address than serve.host says (serve deploy's http_options, a proxy started before this app).
            client = request.client.host if request.client else ""
            if self.cfg.serve.allow_unauthenticated or auth.is_loopback(client):
                return
            raise ApiError(403, "this server has no API keys, so it answers only its own machine: set "
                           "serve.api_keys_file or QLORA_RAY_API_KEYS, or serve.allow_unauthenticated: true",
                           code="unauthenticated_remote")  # fmt: skip
        accepted = auth.accepts(self.key_hashes, request.headers.get("authorization", ""))
        if accepted is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not accepted:
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
            validate_name(name)
        except RegistryError as err:  # a name no adapter can have
            raise ConfigError("of the Serve app", [f"serve.grounding.adapters: {err}"]) from None
        try:
            found = registry.find(name)
        except RegistryError as err:  # damaged: only the requests for it fail
            logging.getLogger(__name__).warning("serve.grounding.adapters: %s", err)
            continue
        if found is None:
            logging.getLogger(__name__).warning(
                "serve.grounding.adapters: %s holds no adapter %r; its answers are grounded once one is registered "
                "under that name. Check the spelling: qlora-ray artifacts list", registry.location, name,
            )  # fmt: skip


def bind(cfg: Config) -> Any:
    """Both deployments, sized from ``cfg.serve``, bound into one application."""
    cfg = pin_local_paths(cfg)
    s = cfg.serve
    key_hashes = auth.key_hashes(s)  # here, where the keys are: replicas may not see this environment or file
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
    return ingress.bind(generator.bind(config), config, key_hashes)
