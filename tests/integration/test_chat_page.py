"""The FAQ chatbot: grounded answers over HTTP, and the chat page driven in a real browser.

A real Serve app on 127.0.0.1 with auth on and ``serve.grounding`` on for one adapter (``faq-g``, trained
nominally on the test FAQ set), and Debian's chromium driven headless by Playwright. Screenshots of the page go
to ``$QLORA_RAY_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the repository).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import requests
from adapters import FAQ, register_adapter, write_faq
from processes import REPO, wait_for
from serving import KEY, deploy, serve_cluster

from qlora_ray.config import DEFAULT_DECLINE_MESSAGE

pytestmark = pytest.mark.ray

STORED_QUESTION, STORED_ANSWER = "what is galaxy organisation", FAQ[0][1]  # FAQ[0] without its tag or case
IN_BETWEEN = "What services does Galaxy offer?"  # near "What environmental services does Galaxy offer?"
FAR_OFF = "How do I bake sourdough bread?"
ARTEFACTS = Path(os.environ.get("QLORA_RAY_TEST_ARTIFACTS", REPO / "test-artifacts"))
# Headless, and nothing that reaches for Google's servers (this network is closed).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip

# Counts, for the next streamed answer, the text chunks the server sent (read from a copy of the response body)
# and the changes to the answer's text in the page.
COUNT_DELTAS = """() => {
    window.streamed = null;
    window.shown = 0;
    new MutationObserver((changes) => {
        window.shown += changes.filter((c) => c.target.classList?.contains('assistant')).length;
    }).observe(document.getElementById('conversation'), {childList: true, subtree: true, characterData: true});
    const fetchOnce = window.fetch;
    window.fetch = async (...args) => {
        window.fetch = fetchOnce;
        const response = await fetchOnce(...args);
        const [page, copy] = response.body.tee();
        new Response(copy).text().then((body) => {
            window.streamed = body.split("\\n\\n").filter((e) => e.startsWith("data: {"))
                .filter((e) => JSON.parse(e.slice(6)).choices[0]?.delta?.content).length;
        });
        return new Response(page, {status: response.status, statusText: response.statusText, headers: response.headers});
    };
}"""


@pytest.fixture(scope="module")
def app(tiny_phi_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("chat")
    with serve_cluster(home, tiny_phi_dir) as cluster:
        faq = write_faq(home / "faq.jsonl")
        register_adapter(cluster["registry"], "faq-g", tiny_phi_dir, seed=3, val_loss=3.0, staging=home, data=faq)
        lost = write_faq(home / "lost.jsonl")  # an adapter whose training data is gone from this machine
        register_adapter(cluster["registry"], "faq-lost", tiny_phi_dir, seed=4, val_loss=4.0, staging=home, data=lost)
        lost.unlink()
        yield deploy(
            cluster, f"serve.api_keys_file={home / 'keys.txt'}", "serve.default_max_tokens=64",
            "serve.max_adapters_per_replica=2", "serve.grounding.enabled=true",
            "serve.grounding.adapters=[faq-g,faq-lost]",
        )  # fmt: skip


def _chat(url, question, model="faq-g", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, **extra}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=60, stream=bool(extra.get("stream")))  # fmt: skip


def test_each_path_answers_and_says_so(app):
    stored = _chat(app, STORED_QUESTION)
    assert stored.status_code == 200, stored.text
    assert stored.headers["x-answer-source"] == "stored" and stored.json()["answer_source"] == "stored"
    assert stored.json()["choices"][0]["message"]["content"] == STORED_ANSWER
    assert stored.json()["choices"][0]["finish_reason"] == "stop" and stored.json()["usage"]["completion_tokens"] > 0

    declined = _chat(app, FAR_OFF)
    assert declined.headers["x-answer-source"] == "declined" and declined.json()["answer_source"] == "declined"
    assert declined.json()["choices"][0]["message"]["content"] == DEFAULT_DECLINE_MESSAGE

    generated = _chat(app, IN_BETWEEN, max_tokens=4)
    assert generated.headers["x-answer-source"] == "model" and generated.json()["answer_source"] == "model"
    assert generated.json()["choices"][0]["message"]["content"] not in (STORED_ANSWER, DEFAULT_DECLINE_MESSAGE)
    assert generated.json()["usage"]["completion_tokens"] <= 4

    health = requests.get(f"{app}/healthz", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert health["grounded"] == {"faq-g": len(FAQ) - 2}  # the training split: two FAQ rows are held out


def test_streamed_and_completion_requests_are_grounded_too(app):
    streamed = _chat(app, STORED_QUESTION, stream=True)
    assert streamed.headers["x-answer-source"] == "stored"
    lines = [line[6:] for line in streamed.iter_lines(decode_unicode=True) if line]
    chunks = [json.loads(line) for line in lines[:-1]]
    assert lines[-1] == "[DONE]" and all(c["answer_source"] == "stored" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == STORED_ANSWER
    # A prompt/completion adapter's raw prompt is its question: /v1/completions is grounded the same way.
    completion = requests.post(f"{app}/v1/completions", json={"model": "faq-g", "prompt": FAR_OFF},
                               headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
    assert completion.headers["x-answer-source"] == "declined"
    assert completion.json()["choices"][0]["text"] == DEFAULT_DECLINE_MESSAGE


def test_grounding_is_per_adapter_and_a_missing_q_and_a_set_is_a_clear_error(app):
    ungrounded = _chat(app, STORED_QUESTION, model="faq-a", max_tokens=4)
    assert ungrounded.status_code == 200 and ungrounded.headers["x-answer-source"] == "model"
    assert ungrounded.json()["choices"][0]["message"]["content"] != STORED_ANSWER
    lost = _chat(app, STORED_QUESTION, model="faq-lost")
    assert lost.status_code == 500 and "Traceback" not in lost.text
    message = lost.json()["error"]["message"]
    assert "'faq-lost' cannot be grounded" in message and "missing or changed" in message
    assert "lost.jsonl" not in message  # the server's paths stay in its log


def test_an_evicted_adapter_takes_its_q_and_a_set_along_and_brings_it_back(app):
    def grounded():
        return requests.get(f"{app}/healthz", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["grounded"]

    first = _chat(app, STORED_QUESTION)
    assert first.headers.get("x-answer-source") == "stored", first.text
    assert "faq-g" in grounded()
    for other in ("faq-a", "faq-b"):  # serve.max_adapters_per_replica=2: faq-g is the least recent, and goes
        assert _chat(app, IN_BETWEEN, model=other, max_tokens=2).status_code == 200
    wait_for(lambda: grounded() == {}, 30, "the evicted adapter's Q&A set to go")
    again = _chat(app, STORED_QUESTION)
    assert again.headers["x-answer-source"] == "stored"
    assert again.json()["choices"][0]["message"]["content"] == STORED_ANSWER
    assert grounded() == {"faq-g": len(FAQ) - 2}


def test_the_chat_page_in_a_real_browser(app):
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine: make setup installs Debian's chromium package (apt-get)")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1024, "height": 800})
        page = context.new_page()
        page.goto(app)
        status, adapter, question = page.locator("#status"), page.locator("#adapter"), page.locator("#question")

        # Auth on: the page asks for the key; a wrong one is refused; the right one, entered once, lists adapters.
        expect(status).to_contain_text("The server needs a valid API key")
        page.get_by_label("API key").fill("wrong-key")
        page.get_by_role("button", name="Use key").click()
        expect(status).to_contain_text("invalid API key")
        page.get_by_label("API key").fill(KEY)
        page.get_by_label("API key").press("Enter")
        expect(page.locator("#adapter option")).to_have_count(4)
        assert adapter.input_value() == "faq-a"  # the registry's best is preselected
        assert page.evaluate("sessionStorage.getItem('qlora-ray-api-key')") == KEY
        assert page.evaluate("localStorage.length") == 0 and not context.cookies()

        # Keyboard only: type, Enter sends; the answer streams into the page delta by delta. The page asks with the
        # server's default temperature (1.0), and the tiny test model sometimes samples the end of text (or only
        # spaces) first: such an answer is asked again (at most three times), since what is checked is how text
        # is shown.
        question.focus()
        for _ in range(3):
            page.evaluate(COUNT_DELTAS)
            page.keyboard.type("what is galaxy ?")
            page.keyboard.press("Enter")
            expect(page.locator("li.source").last).to_have_text("generated by faq-a")  # shown with the headers
            page.wait_for_function("window.streamed !== null")  # the stream has ended: the answer is on the page
            if page.evaluate("window.streamed") >= 1 and page.locator("li.assistant").last.inner_text().strip():
                break
            page.locator("#question").focus()
        answer = page.locator("li.assistant").last
        assert answer.inner_text().strip() and answer.get_attribute("data-source") == "model"
        # The server sends what a slow reader has not taken yet as one chunk, so the number of chunks varies
        # from run to run; the page shows each one as it arrives.
        assert page.evaluate("window.shown") == page.evaluate("window.streamed") >= 1
        assert page.evaluate("document.activeElement.id") == "question"  # focus back in the input box

        # Another adapter: grounded answers, and the page says which path answered.
        adapter.select_option("faq-g")
        expect(page.locator("li.note").last).to_contain_text("Now asking faq-g")
        question.fill(STORED_QUESTION)
        page.get_by_role("button", name="Send").click()
        expect(page.locator("li.source").last).to_have_text("stored answer from the Q&A set")
        expect(page.locator("li.assistant").last).to_have_text(STORED_ANSWER)
        question.fill(FAR_OFF)
        question.press("Enter")
        expect(page.locator("li.source").last).to_have_text("outside the topics this assistant knows")
        expect(page.locator("li.assistant").last).to_have_text(DEFAULT_DECLINE_MESSAGE)

        # A request the server refuses (a prompt over serve.max_prompt_tokens) is explained, not dropped.
        question.fill(" ".join(["galaxy"] * 40))
        question.press("Enter")
        expect(page.locator("li.error").last).to_contain_text("Error 400")
        expect(page.locator("li.error").last).to_contain_text("serve.max_prompt_tokens")
        page.screenshot(path=ARTEFACTS / "chat-page.png", full_page=True)

        # A narrow screen: nothing overflows sideways and the controls stay usable.
        page.set_viewport_size({"width": 360, "height": 740})
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        expect(page.get_by_role("button", name="Send")).to_be_visible()
        page.screenshot(path=ARTEFACTS / "chat-page-narrow.png", full_page=True)

        # The key lives in this tab only: a new tab asks for it again.
        other = context.new_page()
        other.goto(app)
        expect(other.locator("#status")).to_contain_text("The server needs a valid API key")
        browser.close()
    assert (ARTEFACTS / "chat-page.png").stat().st_size > 10_000
