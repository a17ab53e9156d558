"""The Serve app for real: Ray Serve on 127.0.0.1, a tiny base model, adapters in a registry, HTTP clients.

One local Ray for the module; the app is deployed three times with different settings (auth on; auth off with
tight limits; two replicas for the kill test).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from adapters import register_adapter
from processes import wait_for
from serving import KEY, PROMPT, deploy, events, post, serve_cluster

pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def cluster(tiny_phi_dir, tmp_path_factory):
    with serve_cluster(tmp_path_factory.mktemp("serve"), tiny_phi_dir) as running:
        yield running


@pytest.fixture(scope="module")
def app(cluster):
    keys = f"serve.api_keys_file={cluster['home'] / 'keys.txt'}"
    return deploy(cluster, keys, "serve.max_batch_size=8", "serve.max_adapters_per_replica=2")




def test_health_models_and_auth(app):
    health = requests.get(f"{app}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"  # no key needed
    assert requests.get(f"{app}/v1/models", timeout=10).status_code == 401
    wrong = requests.get(f"{app}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert "nope" not in wrong.text
    models = requests.get(f"{app}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert {m["id"]: m["default"] for m in models["data"]} == {"faq-a": True, "faq-b": False}  # best = lower loss
    assert post(app, "/v1/completions", {"prompt": PROMPT}, key=None).status_code == 401


def test_the_chat_page_and_its_files_are_served_without_a_key(app):
    page = requests.get(f"{app}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needed in ('<label for="question"', '<label for="adapter"', '<label for="api-key"', 'role="log"',
                   "/static/chat.js", "/static/chat.css"):  # fmt: skip
        assert needed in page.text
    script = requests.get(f"{app}/static/chat.js", timeout=10)
    assert script.status_code == 200 and "text/javascript" in script.headers["content-type"]
    assert "/v1/chat/completions" in script.text and "sessionStorage" in script.text
    assert requests.get(f"{app}/static/chat.css", timeout=10).headers["content-type"].startswith("text/css")
    for other in ("app.py", "..%2Fapp.py", "index.html"):  # only the page's own files, nothing else
        missing = requests.get(f"{app}/static/{other}", timeout=10)
        assert missing.status_code == 404 and "error" in missing.json()


def test_completion_json_and_stream_agree(app):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    whole = post(app, "/v1/completions", body)
    assert whole.status_code == 200, whole.text
    data = whole.json()
    assert data["object"] == "text_completion" and data["model"] == "faq-a"  # the registry's best by default
    assert data["usage"]["completion_tokens"] <= 6 and data["usage"]["prompt_tokens"] == 5
    assert data["choices"][0]["finish_reason"] in ("stop", "length")
    assert whole.headers["x-answer-source"] == data["answer_source"] == "model"  # grounding is off by default
    streamed = post(app, "/v1/completions", {**body, "stream": True}, stream=True)
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    chunks = events(streamed)
    assert "".join(c["choices"][0]["text"] for c in chunks) == data["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == data["choices"][0]["finish_reason"]


def test_the_openai_client_works_unchanged(app):
    from openai import OpenAI

    client = OpenAI(base_url=f"{app}/v1", api_key=KEY)
    assert {m.id for m in client.models.list()} == {"faq-a", "faq-b"}
    completion = client.completions.create(model="faq-b", prompt=PROMPT, max_tokens=5, temperature=0)
    assert completion.model == "faq-b" and completion.usage.completion_tokens <= 5
    chat = client.chat.completions.create(
        model="faq-a", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0
    )
    # A prompt/completion adapter answers the last user message as its prompt: the same as a completion.
    same = client.completions.create(model="faq-a", prompt=PROMPT, max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == same.choices[0].text
    stream = client.chat.completions.create(
        model="faq-a", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content


def test_two_adapters_side_by_side_answer_differently(app):
    def ask(model):
        body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        return post(app, "/v1/completions", body).json()["choices"][0]["text"]

    with ThreadPoolExecutor(6) as pool:  # concurrent: they share batches on the replica
        answers = list(pool.map(ask, ["faq-a", "faq-b"] * 3))
    assert answers[0::2] == [answers[0]] * 3 and answers[1::2] == [answers[1]] * 3
    assert answers[0] != answers[1]


def test_a_newly_registered_adapter_is_served_without_a_restart(app, cluster):
    register_adapter(cluster["registry"], "faq-c", cluster["base"], seed=3, val_loss=3.0, staging=cluster["home"])
    models = requests.get(f"{app}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert "faq-c" in {m["id"] for m in models["data"]}
    reply = post(app, "/v1/completions", {"model": "faq-c", "prompt": PROMPT, "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["model"] == "faq-c"
    loaded = requests.get(f"{app}/healthz", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["adapters"]
    assert "faq-c" in loaded and len(loaded) == 2  # serve.max_adapters_per_replica: the least recent went
    again = post(app, "/v1/completions", {"model": "faq-a", "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert again.status_code == 200  # an evicted adapter loads again on its next request


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": PROMPT, "model": "no-such"}, 404, "no adapter named 'no-such'"),
        ({"prompt": PROMPT, "model": "../registry"}, 404, "invalid adapter name"),
        ({"prompt": " ".join(["GALAXY"] * 40)}, 400, "at most 32 (serve.max_prompt_tokens)"),
        ({"prompt": PROMPT, "max_tokens": 601}, 400, "at most 600 tokens per request (serve.max_new_tokens)"),
        ({"prompt": PROMPT, "temperature": 5}, 422, "temperature"),
        ({"max_tokens": 3}, 422, "prompt: Field required"),
        ({"prompt": PROMPT, "n": 0}, 422, "n:"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_shaped_errors(app, body, status, fragment):
    reply = post(app, "/v1/completions", body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"] and error["type"] and "Traceback" not in reply.text


def test_malformed_json_and_chat_without_a_user_message(app):
    broken = requests.post(f"{app}/v1/chat/completions", data="{not json", timeout=10,
                           headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    system_only = post(app, "/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]})
    assert system_only.status_code == 400 and "no user message" in system_only.json()["error"]["message"]


def test_without_keys_no_auth_and_overload_and_timeouts_answer_cleanly(cluster, app):
    # Tight limits: two requests in flight, one queued, and 0.3 s per request; greedy 500-token answers.
    url = deploy(cluster, "serve.max_batch_size=2", "serve.max_ongoing_requests=2", "serve.max_queued_requests=1",
                 "serve.request_timeout_s=0.3")  # fmt: skip
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 200  # auth off: no key needed
    body = {"prompt": PROMPT, "max_tokens": 500, "temperature": 0, "stop": ["no-such-stop"]}
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda _: post(url, "/v1/completions", body, key=None), range(12)))
    statuses = [r.status_code for r in replies]
    assert 503 in statuses and set(statuses) <= {200, 503, 504}, statuses
    for reply in replies:
        if reply.status_code == 503:
            assert reply.headers.get("Retry-After") == "1" and "capacity" in reply.json()["error"]["message"], (
                reply.text
            )
        if reply.status_code == 504:
            assert "serve.request_timeout_s" in reply.json()["error"]["message"]
    assert 504 in statuses or 200 in statuses


def test_a_killed_replica_is_replaced_while_requests_keep_being_answered(cluster, app):
    import ray

    url = deploy(cluster, "serve.num_replicas=2", "serve.cpus_per_replica=0.5")
    statuses: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            reply = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4}, key=None)
            statuses.append((time.monotonic(), reply.status_code))

    replicas = _generator_replicas()
    assert len(replicas) == 2
    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    wait_for(lambda: len(statuses) >= 5, 60, "traffic to flow")
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    wait_for(lambda: len(_generator_replicas()) == 2 and replicas[0] not in _generator_replicas(), 120,
             "Serve to replace the killed replica")  # fmt: skip
    time.sleep(1)
    stop.set()
    for worker in workers:
        worker.join()
    after = [s for t, s in statuses if t > killed_at]
    assert after.count(200) >= 5, statuses
    assert len(after) - after.count(200) <= 3 and set(after) <= {200, 503}, after  # only requests in flight lost


def _generator_replicas() -> list[str]:
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == "serve" and "#Generator#" in a["name"])
