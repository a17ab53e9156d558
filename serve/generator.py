"""The generator deployment: one base model per replica, adapters multiplexed onto it, requests batched.

- The replica loads the base once (``qlora_ray.generate.load_inference_model``) and its tokenizer.
- The request's adapter arrives as Serve's multiplexed model id. ``ray.serve.multiplexed`` loads it from the
  registry on first use and keeps ``serve.max_adapters_per_replica`` of them (least recently used go), and
  Serve routes later requests for it to a replica that has it. A request marks its adapter in use as soon as
  it has it, so an eviction unloads the adapter only once no request uses it; a request whose adapter is gone
  anyway when it would start generating fails (503, retry) rather than be answered by the base model.
- Continuous batching (``qlora_ray.generate.DecodeBatch``): up to ``serve.max_batch_size`` requests decode together,
  whatever their adapters (PEFT's mixed-adapter batches); a waiting request joins the running batch between
  two decode steps instead of waiting for it to end, and every request streams its own deltas. A request that
  cannot join (its prefill fails) fails alone; a decode step that fails fails the requests in it.
- The event loop only queues requests and delivers chunks; the work runs on threads: ``prepare`` (chat
  templates and tokenising, with a tokenizer of its own), ``generate`` (torch: adapter loads and unloads,
  prefills and decode steps, in order), ``grounding`` (Q&A sets and embeddings), one worker each, and the loop's
  default pool (registry reads and adapter downloads, which then hold up no request's tokenising).
- Grounding (``serve.grounding``): a covered adapter's Q&A set is built on its first request, after the adapter
  is loaded, once per training dataset and split (``serve.grounding.QASets``); a build that failed is
  answered with the same error for ``serve.grounding.RETRY_BUILD_S`` seconds before it is tried again. A
  stored answer or a decline honours the request's ``max_tokens`` and ``stop``.

``Generator.generate`` takes ``{"prompt": str}`` or ``{"messages": [{"role", "content"}, ...]}`` (roles
system, user, assistant) plus ``"sampling"``: the fields of ``qlora_ray.generate.Sampling`` (``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``). Errors for the client are ``serve.protocol.ApiError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from data.formats import AUTO, format_named
from data.formats.prompt_completion import PromptCompletion
from qlora_ray import console
from qlora_ray.config import from_dict
from qlora_ray.registry import MANIFEST, Registry, RegistryError, saved_data_config
from serve.grounding import MODEL, RETRY_BUILD_S, QASet, QASets, dataset_key, fit_answer, training_examples
from serve.protocol import ApiError

log = logging.getLogger("ray.serve")  # Serve writes it to the replica logs, with request ids

PROMPT_AS_GIVEN = PromptCompletion.name  # the format of an adapter without saved data settings
Prepared = tuple[dict[str, Any] | None, list[int]]  # a request as an example of the adapter's format, its prompt ids


@dataclass(frozen=True)
class PromptSettings:
    """How an adapter's training data built prompts: chat requests are turned into prompts the same way."""

    format: str
    template: str


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter: its prompt settings, where it is, its manifest, and its Q&A set's key (None: not
    grounded)."""

    prompts: PromptSettings
    directory: str
    manifest: dict[str, Any]
    grounding: Hashable | None = None


@dataclass(eq=False)
class _Job:
    """One request in the replica: its prompt, settings and adapter, and the queue its chunks arrive on."""

    prompt: list[int]
    sampling: Any
    name: str
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    gone: bool = False


class _Loaded:
    """Serve's multiplexed handle of one loaded adapter; Serve calls ``__del__`` when its LRU drops it."""

    def __init__(self, owner: Generator, name: str):
        self.owner, self.name = owner, name
        self.loop = asyncio.get_running_loop()
        self.released = False

    def __del__(self) -> None:
        # Serve calls this from a thread pool on eviction, and garbage collection may call it again later.
        if not self.released:
            self.released = True
            with contextlib.suppress(RuntimeError):  # a replica shutting down has closed its event loop
                self.loop.call_soon_threadsafe(self.owner.release, self.name)


class Generator:
    """A Serve replica that generates completions for any registered adapter on one base model."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from qlora_ray.generate import AdapterSet, load_inference_model
        from qlora_ray.model import load_tokenizer

        console.setup_replica()
        self.cfg = from_dict(config, source="serve app")
        serve_cfg = self.cfg.serve
        torch.set_num_threads(max(1, round(serve_cfg.cpus_per_replica)))
        self.device = "cuda" if serve_cfg.gpus_per_replica > 0 else "cpu"
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        # Request preparation on a thread of its own: tokenising a long prompt never holds up the event loop,
        # which delivers the other requests' chunks. One thread, with its own copy of the tokenizer: a fast
        # tokenizer is not safe to call from two threads at once (the torch thread decodes with the other).
        self.prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        # Grounding embeds on threads of its own: building a Q&A set pauses neither decoding nor the grounded
        # requests of adapters whose set is built.
        self.grounding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grounding")
        self.deciding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grounding-decide")
        self.registry = Registry(self.cfg.run.registry)
        self.cache = Path(tempfile.gettempdir()) / f"qlora-ray-adapters-{os.getpid()}"
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.prompt_tokenizer = copy.deepcopy(self.tokenizer)
        self.adapters = AdapterSet(load_inference_model(self.cfg.model, self.device))
        self.loaded: dict[str, AdapterInfo] = {}
        self.qa_sets = QASets()  # grounded adapters' Q&A sets (serve.grounding), by dataset
        self.embedder: Any = None  # all-MiniLM-L6-v2, loaded with the first Q&A set
        self.in_use: Counter[str] = Counter()
        self.dropped: set[str] = set()  # evicted while requests still used them: unloaded when the last ends

        async def load(name: str) -> _Loaded:  # a plain function: Serve keeps its LRU as an attribute of it
            return await self._load(name)

        self.adapter = serve.multiplexed(max_num_models_per_replica=serve_cfg.max_adapters_per_replica)(load)
        self.waiting: deque[_Job] = deque()
        self.wakeup = asyncio.Event()
        self.scheduler: asyncio.Task | None = None
        self.step_seconds: deque[tuple[int, float]] = deque(maxlen=1000)  # (rows, seconds) of recent steps
        log.info("generator ready: %s on %s, %d torch threads", self.cfg.model.name_or_path, self.device,
                 torch.get_num_threads())  # fmt: skip

    async def ready(self) -> dict[str, Any]:
        """The replica's state: base model, device, loaded adapters, and the recent decode steps' batch size."""
        steps = list(self.step_seconds)
        grounded = {name: self.qa_sets.built.get(info.grounding) for name, info in sorted(self.loaded.items())}
        return {
            "base_model": self.cfg.model.name_or_path, "device": self.device, "adapters": sorted(self.loaded),
            "grounded": {name: len(qa) for name, qa in grounded.items() if qa is not None},
            "recent_steps": len(steps), "mean_rows_per_step": sum(r for r, _ in steps) / max(len(steps), 1),
            "mean_step_seconds": sum(t for _, t in steps) / max(len(steps), 1),
        }  # fmt: skip

    # Adapters

    async def _load(self, name: str) -> _Loaded:
        """Multiplexed loader: fetch the adapter from the registry and put it on the base model."""
        from qlora_ray.generate import AdapterError

        try:
            info = await self._on(None, self._fetch, name)
        except RegistryError as err:  # its messages name no server path
            raise ApiError(404, f"adapter {name!r} cannot be served: {err}", param="model") from None
        except (ValueError, OSError) as err:  # ConfigError, a manifest that is not JSON: paths stay in the log
            raise _unservable(name, err) from None
        # Loads and unloads run on the torch thread in order, so a queued unload never undoes this load.
        started = time.perf_counter()
        try:
            if await self._run(self._ensure_loaded, name, info.directory):
                log.info("adapter %s loaded in %.2f s", name, time.perf_counter() - started)
        except AdapterError as err:
            raise _unservable(name, err) from None
        self.dropped.discard(name)  # loaded again after an eviction: it stays until Serve drops it anew
        self.loaded[name] = info
        return _Loaded(self, name)

    def _fetch(self, name: str) -> AdapterInfo:
        """Off the event loop: the adapter's local directory (downloaded from a URI registry), manifest and
        settings."""
        directory = Path(self.registry.local_dir(name, self.cache))
        manifest = json.loads((directory / MANIFEST).read_text())  # local_dir's copy: no second fetch
        grounding = dataset_key(directory, manifest) if self.cfg.serve.grounding.covers(name) else None
        return AdapterInfo(_prompt_settings(directory), str(directory), manifest, grounding)

    def _ensure_loaded(self, name: str, directory: str) -> bool:
        if name in self.adapters.names:
            return False
        self.adapters.load(name, directory)
        return True

    def release(self, name: str) -> None:
        """Serve's LRU dropped an adapter: unload it now, or when the requests using it end."""
        self.dropped.add(name)
        self._unload_dropped()

    def _unload_dropped(self) -> None:
        for name in [n for n in self.dropped if not self.in_use[n]]:
            self.dropped.discard(name)
            self.loaded.pop(name, None)
            self.executor.submit(self.adapters.unload, name)
            log.info("adapter %s unloaded", name)
        self.qa_sets.keep({info.grounding for info in self.loaded.values()})

    # Requests

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's completion for the adapter Serve names (its multiplexed model id)."""
        async with contextlib.aclosing(self.stream(serve.get_multiplexed_model_id(), request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def stream(self, name: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream adapter ``name``'s completion of ``request`` as ``{"text", "finish_reason", "source", ...}``.

        ``source`` says which path answers: the model, or (``serve.grounding``) a stored answer or a decline,
        which arrive whole in one chunk. A prompt that is empty, cannot be rendered or tokenised, or is too long
        is a 400 before the request joins any batch.
        """
        from qlora_ray.generate import Sampling

        sampling = Sampling(**request["sampling"])
        await self.adapter(name)
        self.in_use[name] += 1  # from here on, an eviction waits for this request to end
        job: _Job | None = None
        try:
            info = self.loaded.get(name)
            if info is None:
                raise _unloaded(name)
            example, prompt = await self._on(self.prep, self._prepare, request, info, name)
            if info.grounding is not None and example is not None:
                answer = await self._grounded(name, info, example, sampling)
                if answer is not None:
                    yield {**answer, "prompt_tokens": len(prompt)}
                    return
            job = _Job(prompt, sampling, name)
            self.waiting.append(job)
            self.wakeup.set()
            if self.scheduler is None or self.scheduler.done():
                self.scheduler = asyncio.create_task(self._schedule())
            while True:
                chunks = [await job.out.get()]
                while not job.out.empty():  # a reader that fell behind gets what piled up as one chunk
                    chunks.append(job.out.get_nowait())
                failed = next((c for c in chunks if isinstance(c, Exception)), None)
                if failed is not None:
                    raise failed
                last = chunks[-1]
                yield {"text": "".join(c.text for c in chunks), "finish_reason": last.finish_reason,
                       "completion_tokens": last.completion_tokens, "prompt_tokens": len(prompt),
                       "source": MODEL}  # fmt: skip
                if last.finish_reason is not None:
                    return
        finally:
            if job is not None:
                job.gone = True  # finished, failed, or its caller went away: the scheduler drops the row
            self.in_use[name] -= 1
            self._unload_dropped()

    def _prepare(self, request: dict[str, Any], info: AdapterInfo, name: str) -> Prepared:
        """On the prepare thread: the request as an example of the adapter's format, and its prompt's ids."""
        settings, limit = info.prompts, self.cfg.serve.max_prompt_tokens
        example, ids = prompt_for(request, settings.format, settings.template, self.prompt_tokenizer, limit)
        if self.cfg.serve.log_prompts:
            log.info("prompt for %s: %r", name, self.prompt_tokenizer.decode(ids))
        return example, ids

    async def _grounded(self, name: str, info: AdapterInfo, example: dict[str, Any], sampling: Any) -> dict | None:
        """The stored answer or decline for ``example`` (cut to the request's settings), or None: the model answers."""
        try:
            qa = await self.qa_sets.get(info.grounding, lambda: self._build_qa(info))
        except Exception:  # the cause is in the log, once per build
            raise ApiError(500, f"adapter {name!r} cannot be grounded (serve.grounding): its Q&A set could not be "
                           "built (training data missing or changed on the server, or where the server may not read "
                           "it); the server log has the details") from None  # fmt: skip
        verdict = await self._on(self.deciding, qa.decide, example, self.cfg.serve.grounding)
        log.info("grounding %s: %s (nearest question %.3f)", name, verdict.source, verdict.score)
        if verdict.answer is None:
            return None
        text, reason, tokens = await self._on(
            self.prep, fit_answer, verdict.answer, sampling.max_tokens, sampling.stop, self.prompt_tokenizer
        )
        return {"text": text, "finish_reason": reason, "completion_tokens": tokens, "source": verdict.source}

    async def _build_qa(self, info: AdapterInfo) -> QASet:
        """Build the Q&A set of ``info``'s dataset on the grounding thread; a failure's cause goes to the log."""
        started = time.perf_counter()
        try:
            qa = await self._on(self.grounding, self._qa_set, info.directory, info.manifest)
        except Exception as err:
            log.error("the Q&A set of %s cannot be built (serve.grounding): %s; its requests get a 500 for %g s, "
                      "then it is tried again", info.directory, err, RETRY_BUILD_S)  # fmt: skip
            raise
        if not len(qa):
            log.warning("%s: its training split has no question to ground on; the model answers all", info.directory)
        log.info("Q&A set of %s: %d questions in %.2f s", info.directory, len(qa), time.perf_counter() - started)
        return qa

    def _qa_set(self, directory: str, manifest: dict[str, Any]) -> QASet:
        from qlora_ray.metrics import Similarity

        if self.embedder is None:
            self.embedder = Similarity()
        trusted = (self.cfg.run.registry, self.cfg.run.storage_path)
        return QASet(training_examples(directory, manifest, trusted), self.embedder)

    # Batching

    async def _schedule(self) -> None:
        """Continuous batching: waiting requests join the running batch between decode steps."""
        batch, wait = None, self.cfg.serve.batch_wait_timeout_s
        while True:
            if not batch and not self.waiting:
                self.wakeup.clear()
                await self.wakeup.wait()
                await asyncio.sleep(wait)  # let a burst of requests arrive and prefill together
            room = self.cfg.serve.max_batch_size - (len(batch) if batch else 0)
            joining: list[_Job] = []
            while self.waiting and len(joining) < room:  # requests whose caller went away take no place
                job = self.waiting.popleft()
                if not job.gone:
                    joining.append(job)
            try:
                if joining:
                    batch, first = await self._run(self._join, batch, joining)
                    self._deliver(first)
                    joining = []
                if not batch:
                    continue
                gone = {job for job in batch.keys if job.gone}
                if gone:
                    await self._run(batch.drop, gone)
                if batch:
                    started = time.perf_counter()
                    self._deliver(await self._run(batch.step))
                    self.step_seconds.append((len(batch), time.perf_counter() - started))
            except Exception as err:  # a failed step fails the requests in it, not the replica
                log.exception("decode step failed")
                for job in [*(batch.keys if batch else []), *joining]:
                    job.out.put_nowait(_failed(err))
                batch = None

    def _join(self, batch: Any, jobs: list[_Job]) -> tuple[Any, dict[_Job, Any]]:
        """On the torch thread, where adapters load and unload: add ``jobs`` to ``batch`` (a new one on the model
        as it is now when there is none). Returns the batch and each job's first chunk, or its error: a job whose
        adapter is not loaded, or an add that fails (which leaves the batch as it was), fails alone."""
        from qlora_ray.generate import DecodeBatch

        first: dict[_Job, Any] = {job: _unloaded(job.name) for job in jobs if job.name not in self.adapters.names}
        ready = [job for job in jobs if job not in first]
        if not batch:  # the first adapter load wraps the base model: a batch is made on the model as it is
            batch = DecodeBatch(self.adapters.model, self.tokenizer)
        try:  # together, in one prefill
            first.update(_add(batch, ready))
        except Exception as err:  # the batch is as it was: one by one, so only the request at fault fails
            log.exception("%d request(s) could not join the batch together", len(ready))
            first.update(dict.fromkeys(ready, _failed(err)))
            for job in ready if len(ready) > 1 else []:
                try:
                    first.update(_add(batch, [job]))
                except Exception as own:
                    first[job] = _failed(own)
        return batch, first

    def _deliver(self, chunks: dict[Any, Any]) -> None:
        for job, chunk in chunks.items():
            job.out.put_nowait(chunk)

    async def _run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the torch thread."""
        return await self._on(self.executor, fn, *args)

    async def _on(self, executor: ThreadPoolExecutor | None, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on ``executor`` (None: the event loop's default thread pool)."""
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def _add(batch: Any, jobs: list[_Job]) -> dict[_Job, Any]:
    """``jobs`` into ``batch`` (``DecodeBatch.add``: all or none); each one's first chunk."""
    if not jobs:
        return {}
    return batch.add(jobs, [j.prompt for j in jobs], [j.sampling for j in jobs], [j.name for j in jobs])


def _unservable(name: str, err: Exception) -> ApiError:
    """A 404 for an adapter that cannot be loaded; the cause, with its paths, goes to the log only."""
    log.error("adapter %s cannot be served: %s", name, err)
    return ApiError(404, f"adapter {name!r} cannot be served ({type(err).__name__}: its files or settings are not "
                    "usable; the server log has the details)", param="model")  # fmt: skip


def _unloaded(name: str) -> ApiError:
    return ApiError(503, f"adapter {name!r} was unloaded; retry", param="model")


def _failed(err: Exception) -> ApiError:
    return ApiError(500, f"generation failed ({type(err).__name__}); the server log has the details")


def prompt_for(request: dict[str, Any], fmt: str, template: str, tokenizer: Any, limit: int) -> Prepared:
    """A request as an example of an adapter's data format ``fmt`` (None for a raw prompt the format cannot
    take) and its prompt's token ids, built by the formatter the adapter was trained with.

    Raises ApiError 400 (param ``messages`` or ``prompt``) for: messages the format cannot ask or the chat template
    cannot render (whatever the template raises), text that is not valid Unicode (a lone surrogate), a prompt
    with no token, or one over ``limit`` tokens (code ``context_length_exceeded``).
    """
    from data.templates import build_prompt, example_from_messages
    from data.tokenize import encode_prompt

    chat = request.get("messages") is not None
    param = "messages" if chat else "prompt"
    if chat:
        try:
            example = example_from_messages(request["messages"], fmt)
            text = build_prompt(example, template, tokenizer)
        except ValueError as err:
            raise ApiError(400, str(err), param=param) from None
        except Exception as err:  # jinja2's TemplateError, or anything else a chat template raises
            raise ApiError(400, f"the model's chat template cannot render these messages ({type(err).__name__}: "
                           f"{err})", param=param) from None  # fmt: skip
    else:
        example, text = format_named(fmt).from_prompt(request["prompt"]), request["prompt"]
    try:
        text.encode("utf-8")
        ids = encode_prompt(tokenizer, text)
    except UnicodeEncodeError as err:  # a lone surrogate: Python strings may hold one, UTF-8 text cannot
        found = f"U+{ord(err.object[err.start]):04X}"
        raise ApiError(
            400, f"the {param} {'hold' if chat else 'holds'} a lone surrogate ({found}), which is not valid Unicode "
            "text; send UTF-8 text (in JSON, escape a character beyond U+FFFF as a pair, e.g. \\ud83d\\ude00)",
            param=param,
        ) from None  # fmt: skip
    special = set(tokenizer.all_special_ids)
    if all(token in special for token in ids):
        empty = "the messages make an empty prompt" if chat else "the prompt is empty"
        raise ApiError(400, f"{empty}: there is no text for the model to continue", param=param)
    if len(ids) > limit:
        raise ApiError(
            400, f"the prompt is {len(ids)} tokens; this server accepts at most {limit} (serve.max_prompt_tokens)."
            " Shorten the prompt.", param=param, code="context_length_exceeded",
        )  # fmt: skip
    return example, ids


def _prompt_settings(directory: Path) -> PromptSettings:
    """The data format and template an adapter was trained with (a plain PEFT adapter: prompts as given)."""
    data = saved_data_config(directory)
    if data is None or data.format == AUTO:
        # Training saves the format it detected, so "auto" comes only from a hand-written config: like a plain
        # adapter, its requests are prompts as given.
        return PromptSettings(format=PROMPT_AS_GIVEN, template="")
    return PromptSettings(format=data.format, template=data.template)
