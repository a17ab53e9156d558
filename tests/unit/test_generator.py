"""The generator replica without Ray: a real ``serve.generator.Generator`` on the tiny model and a registry of
test adapters, driven on an asyncio loop as Serve drives it.

Only Serve's own machinery is replaced: its multiplexed LRU (``Generator.adapter``) by a cache that loads each
adapter once through the replica's loader, and its request context by naming the adapter to ``stream``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
from adapters import register_adapter, write_faq

from data.tokenize import encode_prompt
from serve.generator import Generator, prompt_for
from serve.protocol import ApiError

IN_BETWEEN = "What services does Galaxy offer?"  # near a stored question, not near enough: the model answers
STORED_QUESTION = "what is galaxy organisation"
PROMPT = "GALAXY < what is ?"


@pytest.fixture(scope="module")
def registry(tiny_phi_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("generator")
    faq = write_faq(home / "faq.jsonl")
    for name, seed in (("faq-a", 1), ("faq-b", 2), ("faq-g", 3)):
        register_adapter(home / "registry", name, tiny_phi_dir, seed=seed, val_loss=seed, staging=home, data=faq)
    return home / "registry"


@pytest.fixture
def replica(tiny_phi_dir, registry, tmp_path):
    """A function that makes a Generator with ``serve`` settings; its threads stop when the test ends."""
    made = []

    def make(**serve):
        serve = {"max_prompt_tokens": 64, "grounding": {"enabled": True, "adapters": ["faq-g"]}, **serve}
        config = {"model": {"name_or_path": str(tiny_phi_dir)}, "serve": serve,
                  "run": {"registry": str(registry), "storage_path": str(tmp_path / "runs")}}  # fmt: skip
        generator = Generator(config)
        handles = {}

        async def adapter(name):  # Serve's multiplexed LRU, without its eviction: each adapter loads once
            if name not in handles:
                handles[name] = await generator._load(name)
            return handles[name]

        generator.adapter = adapter
        made.append(generator)
        return generator

    yield make
    for generator in made:
        for pool in (generator.prep, generator.executor, generator.grounding, generator.deciding):
            pool.shutdown(wait=False, cancel_futures=True)


def _request(max_tokens=8, temperature=0.0, prompt=PROMPT, **sampling):
    body = {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
    return {**body, "sampling": {"max_tokens": max_tokens, "temperature": temperature, "top_p": 1.0, "stop": (),
                                 **sampling}}  # fmt: skip


async def _answer(generator, name, request, chunks=None):
    """The whole text of one request, and its last chunk; ``chunks`` collects (arrival time, chunk)."""
    text, last = "", None
    async for last in generator.stream(name, request):
        text += last["text"]
        if chunks is not None:
            chunks.append((time.perf_counter(), last))
    return text, last


async def _until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_an_empty_prompt_is_a_400_before_any_batch(replica):
    generator = replica()

    async def main():
        for request, param in ((_request(prompt=""), "prompt"), (_request(prompt="   "), "prompt"),
                               (_request(prompt=[{"role": "user", "content": ""}]), "messages")):  # fmt: skip
            with pytest.raises(ApiError) as refused:
                await _answer(generator, "faq-a", request)
            assert (refused.value.status, refused.value.param) == (400, param)
            assert "empty" in refused.value.message
        assert generator.scheduler is None and not generator.waiting  # no request reached the batching
        assert generator.in_use["faq-a"] == 0

    asyncio.run(main())


def test_a_request_that_cannot_join_the_batch_fails_alone(replica):
    generator = replica()

    async def main():
        alone, _ = await _answer(generator, "faq-a", _request(max_tokens=120))
        running = [], asyncio.Event()
        chunks, started = running

        async def first():
            async for chunk in generator.stream("faq-a", _request(max_tokens=120)):
                chunks.append(chunk)
                started.set()
            return "".join(c["text"] for c in chunks)

        task = asyncio.create_task(first())
        await started.wait()
        # A request whose first token cannot be sampled (a NaN temperature, which the ingress would refuse).
        with pytest.raises(ApiError) as failed:
            await _answer(generator, "faq-b", _request(temperature=math.nan))
        assert failed.value.status == 500 and "generation failed" in failed.value.message
        assert chunks[-1]["finish_reason"] is None, "the first request must still run when the other fails"
        assert await task == alone and chunks[-1]["finish_reason"] == "length"

    asyncio.run(main())


def test_of_requests_that_join_together_only_the_one_at_fault_fails(replica):
    generator = replica(batch_wait_timeout_s=0.3)  # both arrive within the wait: they would prefill together

    async def main():
        alone, _ = await _answer(generator, "faq-b", _request())
        good, bad = await asyncio.gather(_answer(generator, "faq-b", _request()),
                                         _answer(generator, "faq-a", _request(temperature=math.nan)),
                                         return_exceptions=True)  # fmt: skip
        assert isinstance(bad, ApiError) and bad.status == 500
        assert good[0] == alone and good[1]["finish_reason"] == "length"

    asyncio.run(main())


def test_an_adapter_gone_when_its_request_would_start_is_a_503_not_the_base_models_answer(replica):
    generator = replica(batch_wait_timeout_s=0.5)

    async def main():
        await _answer(generator, "faq-a", _request(max_tokens=2))
        task = asyncio.create_task(_answer(generator, "faq-a", _request()))
        await _until(lambda: generator.waiting)  # queued; the scheduler waits 0.5 s for more
        await generator._run(generator.adapters.unload, "faq-a")  # what a stale unload would do
        with pytest.raises(ApiError) as unloaded:
            await task
        assert unloaded.value.status == 503 and "unloaded; retry" in unloaded.value.message

    asyncio.run(main())


def test_an_adapter_evicted_while_its_request_is_grounded_stays_until_the_request_ends(replica):
    generator = replica()

    async def main():
        alone, _ = await _answer(generator, "faq-g", _request(prompt=IN_BETWEEN))  # loads it, builds its Q&A set
        assert generator.qa_sets.built and "faq-g" in generator.adapters.names
        gate = threading.Event()
        generator.deciding.submit(gate.wait)  # the grounding thread is busy: the next request waits there
        task = asyncio.create_task(_answer(generator, "faq-g", _request(prompt=IN_BETWEEN)))
        await asyncio.sleep(0.3)
        generator.release("faq-g")  # Serve's LRU evicts it meanwhile
        await generator._run(lambda: None)  # an unload would have run by now
        assert "faq-g" in generator.adapters.names
        gate.set()
        text, last = await task
        assert (text, last["source"]) == (alone, "model")  # answered by the adapter, not by the base model
        await generator._run(lambda: None)
        assert "faq-g" not in generator.adapters.names and "faq-g" not in generator.loaded  # unloaded once done
        assert not generator.qa_sets.built  # its Q&A set went with it

    asyncio.run(main())


def test_stored_answers_honour_max_tokens_and_stop_and_count_what_they_return(replica):
    generator = replica()

    async def main():
        asked = [{"role": "user", "content": STORED_QUESTION}]
        whole, last = await _answer(generator, "faq-g", _request(max_tokens=100, prompt=asked))
        assert last["source"] == "stored" and last["finish_reason"] == "stop"
        words = whole.split()
        cut, last = await _answer(generator, "faq-g", _request(max_tokens=3, prompt=STORED_QUESTION))
        assert last["finish_reason"] == "length" and last["completion_tokens"] == 3 and whole.startswith(cut)
        stopped, last = await _answer(generator, "faq-g", _request(100, prompt=STORED_QUESTION, stop=(words[2],)))
        assert last["finish_reason"] == "stop" and stopped == whole[: whole.index(words[2])]
        assert last["completion_tokens"] == len(encode_prompt(generator.tokenizer, stopped))
        assert last["prompt_tokens"] == len(encode_prompt(generator.tokenizer, STORED_QUESTION))

    asyncio.run(main())


def test_a_huge_prompt_is_tokenised_off_the_event_loop(replica, tiny_tokenizer):
    generator = replica(max_prompt_tokens=10_000)
    huge = "galaxy what is the answer ? " * 90_000
    started = time.perf_counter()
    encode_prompt(tiny_tokenizer, huge)
    tokenising = time.perf_counter() - started
    assert tokenising > 0.3, "the prompt must take a while to tokenise for this test to mean anything"

    async def main():
        await _answer(generator, "faq-a", _request(max_tokens=2))
        chunks = []
        streaming = asyncio.create_task(_answer(generator, "faq-a", _request(max_tokens=500), chunks))
        await _until(lambda: chunks)
        gaps, ticking = [], True

        async def ticker():  # how late the event loop runs a 5 ms timer: what delivering chunks waits on
            while ticking:
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                gaps.append(time.perf_counter() - before)

        tick = asyncio.create_task(ticker())
        with pytest.raises(ApiError, match="at most 10000"):
            await _answer(generator, "faq-b", _request(prompt=huge))
        ticking = False
        await tick
        await streaming
        assert max(gaps) < max(0.15, tokenising / 3), (max(gaps), tokenising)

    asyncio.run(main())


def test_prompts_that_cannot_be_rendered_or_encoded_are_400s(tiny_tokenizer):
    import copy

    def refused(request, fmt="prompt_completion", tokenizer=tiny_tokenizer):
        with pytest.raises(ApiError) as err:
            prompt_for(request, fmt, "", tokenizer, 64)
        assert err.value.status == 400
        return err.value

    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    hello = [{"role": "user", "content": "hello world"}]
    assert prompt_for({"messages": hello}, "chat", "", chat, 64)[1] == encode_prompt(chat, "hello world")
    chat.chat_template = "{% if %}"  # not even a template
    error = refused({"messages": hello}, "chat", chat)
    assert error.param == "messages" and "TemplateSyntaxError" in error.message
    chat.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    assert "roles must alternate" in refused({"messages": hello}, "chat", chat).message
    error = refused({"prompt": "hello \ud800 world"})
    assert error.param == "prompt" and "lone surrogate (U+D800)" in error.message
    error = refused({"messages": [{"role": "user", "content": "hello \udfff"}]})
    assert error.param == "messages" and "lone surrogate (U+DFFF)" in error.message
    assert refused({"messages": [{"role": "system", "content": "hello"}]}).message.startswith("messages: there is no")
    too_long = refused({"prompt": " ".join(["hello"] * 65)})
    assert too_long.code == "context_length_exceeded" and "at most 64" in too_long.message
