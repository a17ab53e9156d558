"""The generator deployment: one base model per replica, adapters multiplexed onto it, requests batched.

- The replica loads the base once (``qlora_ray.generate.load_inference_model``) and its tokenizer.
- The request's adapter arrives as Serve's multiplexed model id. ``ray.serve.multiplexed`` loads it from the
  registry on first use and keeps ``serve.max_adapters_per_replica`` of them (least recently used go), and
  Serve routes later requests for it to a replica that has it.
- Continuous batching (``qlora_ray.generate.DecodeBatch``): up to ``serve.max_batch_size`` requests decode together,
  whatever their adapters (PEFT's mixed-adapter batches); a waiting request joins the running batch between
  two decode steps instead of waiting for it to end, and every request streams its own deltas.
- Torch runs on one worker thread, so the event loop stays free to accept and queue requests, and adapter
  loads never race a forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from data.formats import AUTO, DataError, format_named
from data.formats.prompt_completion import PromptCompletion
from qlora_ray import console
from qlora_ray.config import ConfigError, from_dict
from qlora_ray.registry import MANIFEST, Registry, RegistryError, saved_data_config
from serve.grounding import MODEL, QASet, training_examples
from serve.protocol import ApiError

log = logging.getLogger("ray.serve")  # Serve writes it to the replica logs, with request ids

PROMPT_AS_GIVEN = PromptCompletion.name  # the format of an adapter without saved data settings


@dataclass
class PromptSettings:
    """How an adapter's training data built prompts: chat requests are turned into prompts the same way."""

    format: str
    template: str


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
        # Grounding embeds on a thread of its own: building a Q&A set does not pause decoding.
        self.grounding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grounding")
        self.registry = Registry(self.cfg.run.registry)
        self.cache = Path(tempfile.gettempdir()) / f"qlora-ray-adapters-{os.getpid()}"
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.adapters = AdapterSet(load_inference_model(self.cfg.model, self.device))
        self.prompts: dict[str, PromptSettings] = {}
        self.qa_sets: dict[str, QASet] = {}  # grounded adapters' Q&A sets (serve.grounding)
        self.embedder: Any = None  # all-MiniLM-L6-v2, loaded with the first Q&A set
        self.in_use: Counter[str] = Counter()
        self.dropped: set[str] = set()  # evicted while a batch still used them: unloaded when it ends

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
        return {
            "base_model": self.cfg.model.name_or_path, "device": self.device, "adapters": sorted(self.prompts),
            "grounded": {name: len(qa) for name, qa in sorted(self.qa_sets.items())},
            "recent_steps": len(steps), "mean_rows_per_step": sum(r for r, _ in steps) / max(len(steps), 1),
            "mean_step_seconds": sum(t for _, t in steps) / max(len(steps), 1),
        }  # fmt: skip

    async def _load(self, name: str) -> _Loaded:
        """Multiplexed loader: fetch the adapter from the registry and put it on the base model."""
        from qlora_ray.generate import AdapterError
        self.dropped.discard(name)
        try:
            directory = self.registry.local_dir(name, self.cache)
            settings = _prompt_settings(Path(directory))
            manifest = json.loads((Path(directory) / MANIFEST).read_text())  # local_dir's copy: no second fetch
        except (RegistryError, ConfigError, OSError) as err:
            raise ApiError(404, f"adapter {name!r} cannot be served: {err}", param="model") from None
        if self.cfg.serve.grounding.covers(name) and name not in self.qa_sets:
            await self._ground(name, directory, manifest)
        # Loads and unloads run on the torch thread in order, so a queued unload never undoes this load.
        started = time.perf_counter()
        try:
            if await self._run(self._ensure_loaded, name, directory):
                log.info("adapter %s loaded in %.2f s", name, time.perf_counter() - started)
        except AdapterError as err:
            self.qa_sets.pop(name, None)
            raise ApiError(404, f"adapter {name!r} cannot be served: {err}", param="model") from None
        self.prompts[name] = settings
        return _Loaded(self, name)

    async def _ground(self, name: str, directory: str, manifest: dict[str, Any]) -> None:
        """Build adapter ``name``'s Q&A set (``serve.grounding``); a failure is a 500 whose cause goes to the log."""
        started = time.perf_counter()
        try:
            qa = await self._on(self.grounding, self._qa_set, directory, manifest)
        except (ConfigError, DataError, OSError, RuntimeError) as err:  # GroundingError is a RuntimeError
            log.error("adapter %s cannot be grounded (serve.grounding): %s", name, err)
            raise ApiError(500, f"adapter {name!r} cannot be grounded (serve.grounding): its Q&A set could not be "
                           "built (training data missing or changed on the server); the server log has the details"
                           ) from None  # fmt: skip
        if not len(qa):
            log.warning("adapter %s: its training split has no question to ground on; the model answers all", name)
        log.info("adapter %s grounded on %d questions in %.2f s", name, len(qa), time.perf_counter() - started)
        self.qa_sets[name] = qa

    def _qa_set(self, directory: str, manifest: dict[str, Any]) -> QASet:
        from qlora_ray.metrics import Similarity

        if self.embedder is None:
            self.embedder = Similarity()
        return QASet(training_examples(directory, manifest), self.embedder)

    def _ensure_loaded(self, name: str, directory: str) -> bool:
        if name in self.adapters.names:
            return False
        self.adapters.load(name, directory)
        return True

    def release(self, name: str) -> None:
        """Serve's LRU dropped an adapter: unload it now, or when the batches using it end."""
        self.dropped.add(name)
        self._unload_dropped()

    def _unload_dropped(self) -> None:
        for name in [n for n in self.dropped if not self.in_use[n]]:
            self.dropped.discard(name)
            self.prompts.pop(name, None)
            self.qa_sets.pop(name, None)
            self.executor.submit(self.adapters.unload, name)
            log.info("adapter %s unloaded", name)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's completion as ``{"text", "finish_reason", "source", ...}`` dicts.

        ``source`` says which path answers: the model, or (``serve.grounding``) a stored answer or a decline,
        which arrive whole in one chunk.
        """
        from qlora_ray.generate import Sampling

        name = serve.get_multiplexed_model_id()
        await self.adapter(name)
        example = self._example(request, name)
        prompt = self._prompt_ids(request, example, name)
        if self.cfg.serve.log_prompts:
            log.info("prompt for %s: %r", name, self.tokenizer.decode(prompt))
        qa = self.qa_sets.get(name)
        if qa is not None and example is not None:
            verdict = await self._on(self.grounding, qa.decide, example, self.cfg.serve.grounding)
            log.info("grounding %s: %s (nearest question %.3f)", name, verdict.source, verdict.score)
            if verdict.answer is not None:
                tokens = len(self.tokenizer(verdict.answer, add_special_tokens=False)["input_ids"])
                yield {"text": verdict.answer, "finish_reason": "stop", "completion_tokens": tokens,
                       "prompt_tokens": len(prompt), "source": verdict.source}  # fmt: skip
                return
        job = _Job(prompt, Sampling(**request["sampling"]), name)
        self.in_use[name] += 1
        self.waiting.append(job)
        self.wakeup.set()
        if self.scheduler is None or self.scheduler.done():
            self.scheduler = asyncio.create_task(self._schedule())
        try:
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
            job.gone = True  # finished, failed, or its caller went away: the scheduler drops the row
            self.in_use[name] -= 1
            self._unload_dropped()

    def _example(self, request: dict[str, Any], name: str) -> dict[str, Any] | None:
        """The request as an example of the adapter's data format; None for a raw prompt the format cannot take."""
        from data.templates import example_from_messages

        fmt = self.prompts[name].format
        if request.get("messages") is not None:
            try:
                return example_from_messages(request["messages"], fmt)
            except ValueError as err:
                raise ApiError(400, str(err), param="messages") from None
        return format_named(fmt).from_prompt(request["prompt"])

    def _prompt_ids(self, request: dict[str, Any], example: dict[str, Any] | None, name: str) -> list[int]:
        """The prompt's token ids, built by the formatter the adapter was trained with; too long is a 400."""
        from data.templates import build_prompt
        from data.tokenize import encode_prompt

        if request.get("messages") is not None:
            assert example is not None
            try:
                text = build_prompt(example, self.prompts[name].template, self.tokenizer)
            except ValueError as err:
                raise ApiError(400, str(err), param="messages") from None
        else:
            text = request["prompt"]
        ids = encode_prompt(self.tokenizer, text)
        limit = self.cfg.serve.max_prompt_tokens
        if len(ids) > limit:
            raise ApiError(
                400, f"the prompt is {len(ids)} tokens; this server accepts at most {limit} (serve.max_prompt_tokens)."
                " Shorten the prompt.", param="messages" if request.get("messages") is not None else "prompt",
                code="context_length_exceeded",
            )  # fmt: skip
        return ids

    async def _schedule(self) -> None:
        """Continuous batching: waiting requests join the running batch between decode steps."""
        from qlora_ray.generate import BASE, DecodeBatch

        batch, wait = None, self.cfg.serve.batch_wait_timeout_s
        while True:
            if not batch and not self.waiting:
                self.wakeup.clear()
                await self.wakeup.wait()
                await asyncio.sleep(wait)  # let a burst of requests arrive and prefill together
            if not batch:  # a fresh batch on the model as it is now (the first adapter load wraps the base)
                batch = DecodeBatch(self.adapters.model, self.tokenizer)
            joining: list[_Job] = []
            try:
                room = self.cfg.serve.max_batch_size - len(batch)
                joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                joining = [job for job in joining if not job.gone]
                if joining:
                    names = [j.name for j in joining] if self.adapters.peft is not None else None
                    names = [n if n in self.adapters.names else BASE for n in names] if names else None
                    args = (joining, [j.prompt for j in joining], [j.sampling for j in joining], names)
                    self._deliver(await self._run(batch.add, *args))
                gone = {job for job in batch.keys if job.gone}
                if gone:
                    await self._run(batch.drop, gone)
                if batch:
                    started = time.perf_counter()
                    self._deliver(await self._run(batch.step))
                    self.step_seconds.append((len(batch), time.perf_counter() - started))
            except Exception as err:  # a failed step fails the requests in it, not the replica
                log.exception("decode step failed")
                failure = ApiError(500, f"generation failed ({type(err).__name__}); the server log has the details")
                for job in [*batch.keys, *joining]:
                    job.out.put_nowait(failure)
                batch = None

    def _deliver(self, chunks: dict[Any, Any]) -> None:
        for job, chunk in chunks.items():
            job.out.put_nowait(chunk)

    async def _run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the torch thread."""
        return await self._on(self.executor, fn, *args)

    async def _on(self, executor: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def _prompt_settings(directory: Path) -> PromptSettings:
    """The data format and template an adapter was trained with (a plain PEFT adapter: prompts as given)."""
    data = saved_data_config(directory)
    if data is None or data.format == AUTO:
        # Training saves the format it detected, so "auto" comes only from a hand-written config: like a plain
        # adapter, its requests are prompts as given.
        return PromptSettings(format=PROMPT_AS_GIVEN, template="")
    return PromptSettings(format=data.format, template=data.template)
