"""The Serve app against careless and hostile clients, for real: Ray Serve on 127.0.0.1, raw sockets, the
official openai client and LangChain's chat model. Keys checked before bodies are read; every request limit
answered with its setting's name; slow uploads timed out; a running stream unhurt by bad requests; the
OpenAI API's optional fields (content parts, developer messages, n, seed, nulls) honoured or refused.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from adapters import register_adapter
from processes import wait_for
from serving import KEY, PROMPT, deploy, events, post, serve_cluster

pytestmark = pytest.mark.ray

LIMITS = ["serve.body_timeout_s=3", "serve.max_body_bytes=200000", "serve.max_messages=8", "serve.max_choices=3",
          "serve.max_message_chars=2000", "serve.max_stop_strings=2", "serve.max_stop_chars=8"]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tiny_phi_dir, tmp_path_factory):
    with serve_cluster(tmp_path_factory.mktemp("serve"), tiny_phi_dir) as running:
        yield running


@pytest.fixture(scope="module")
def app(cluster):
    # Serve's proxy listens on every address (allowed: keys are set); the tests call it on 127.0.0.1.
    url = deploy(cluster, f"serve.api_keys_file={cluster['home'] / 'keys.txt'}", "serve.host=0.0.0.0", *LIMITS)
    return url.replace("0.0.0.0", "127.0.0.1")



def _raw(url: str, path: str, head: dict[str, str], body: bytes = b"", timeout: float = 30) -> tuple[int, str]:
    """One HTTP/1.1 request over a plain socket, the body sent as given (even a lie about its length);
    the status code and the response, read until the server closes or ``timeout``."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Connection: close", *(f"{k}: {v}" for k, v in head.items())]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            for at in range(0, len(body), 1 << 16):
                conn.sendall(body[at : at + (1 << 16)])
        except OSError:  # the server answered and closed before taking the rest: that is the point
            pass
        reply = b""
        try:
            while chunk := conn.recv(65536):
                reply += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    text = reply.decode(errors="replace")
    return int(text.split(" ", 2)[1]) if text.startswith("HTTP/") else 0, text



def test_generated_docs_are_off_and_health_says_more_only_with_a_key(app):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert requests.get(f"{app}{path}", timeout=10).status_code == 404
    bare = requests.get(f"{app}/healthz", timeout=10)
    assert bare.status_code == 200 and bare.json() == {"status": "ok"}  # no adapter names, no counts
    keyed = requests.get(f"{app}/healthz", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert keyed["status"] == "ok" and "adapters" in keyed and "base_model" in keyed


def test_a_request_without_a_key_is_refused_before_its_body_is_read(app):
    # The headers promise 50 MB and only 1 kB follows: the 401 must come without waiting for the rest.
    started = time.monotonic()
    head = {"Content-Type": "application/json", "Content-Length": str(50_000_000)}
    status, reply = _raw(app, "/v1/completions", head, b" " * 1000, timeout=20)
    assert status == 401 and "missing API key" in reply, reply
    assert time.monotonic() - started < 15  # well before serve.body_timeout_s would have given up on the body
    status, reply = _raw(app, "/v1/completions", {**head, "Authorization": "Bearer wrong"}, b" " * 1000)
    assert status == 401 and "invalid API key" in reply
    # With the key, the same promise is answered 413 from the header alone.
    status, reply = _raw(app, "/v1/completions", {**head, "Authorization": f"Bearer {KEY}"}, b" " * 1000)
    assert status == 413 and "serve.max_body_bytes" in reply


BAD_BODIES = [
    ({"prompt": ""}, 400, "prompt"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "messages"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c"]}, 400, "serve.max_stop_strings"),
    ({"prompt": PROMPT, "stop": ["123456789"]}, 400, "serve.max_stop_chars"),
    ({"prompt": "x" * 2001}, 400, "serve.max_message_chars"),
    ({"messages": [{"role": "user", "content": "x" * 2001}]}, 400, "serve.max_message_chars"),
    ({"messages": [{"role": "user", "content": "hi"}] * 9}, 400, "serve.max_messages"),
    ({"prompt": PROMPT, "n": 4}, 400, "serve.max_choices"),
    ({"prompt": PROMPT, "logprobs": 2}, 400, "logprobs is not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "text only"),
    ({"prompt": PROMPT, "model": "no-such"}, 404, "no-such"),
    ({"prompt": "y" * 150_000 + " " * 60_000}, 413, "serve.max_body_bytes"),
]


@pytest.mark.parametrize(("body", "status", "fragment"), BAD_BODIES)
def test_bad_requests_are_answered_with_the_setting_or_field_to_fix(app, body, status, fragment):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = post(app, path, body)
    assert reply.status_code == status, reply.text
    assert fragment in reply.json()["error"]["message"] and "Traceback" not in reply.text


def test_text_that_is_not_unicode_is_a_400(app):
    head = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    for path, raw in (("/v1/completions", b'{"prompt": "GALAXY \\ud800 what"}'),
                      ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}')):  # fmt: skip
        reply = requests.post(f"{app}{path}", data=raw, headers=head, timeout=30)
        assert reply.status_code == 400 and "lone UTF-16 surrogate" in reply.json()["error"]["message"], reply.text


def test_an_unknown_adapter_is_named_alone(app, cluster):
    reply = post(app, "/v1/completions", {"prompt": PROMPT, "model": "faq-z"})
    message = reply.json()["error"]["message"]
    assert reply.status_code == 404 and "faq-z" in message
    assert "faq-a" not in message and "faq-b" not in message and str(cluster["home"]) not in message
    found = requests.get(f"{app}/v1/models/faq-b", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert found.status_code == 200 and found.json()["id"] == "faq-b" and found.json()["object"] == "model"
    missing = requests.get(f"{app}/v1/models/faq-z", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert missing.status_code == 404 and requests.get(f"{app}/v1/models/faq-b", timeout=10).status_code == 401


def _bad_requests(url: str) -> list[int]:
    """One of every kind of bad request; their statuses."""
    statuses = [post(url, p, b).status_code for b, _, _ in BAD_BODIES
                for p in ["/v1/chat/completions" if "messages" in b else "/v1/completions"]]  # fmt: skip
    head = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    statuses.append(requests.post(f"{url}/v1/completions", data=b"{not json", headers=head, timeout=30).status_code)
    statuses.append(requests.post(f"{url}/v1/completions", data=b'"\\ud800"', headers=head, timeout=30).status_code)
    statuses.append(post(url, "/v1/completions", {"prompt": PROMPT}, key="wrong").status_code)
    statuses.append(post(url, "/v1/completions", {"prompt": " ".join(["GALAXY"] * 40)}).status_code)  # too long
    # 40 MB, sent chunked (no length to refuse it by): read up to serve.max_body_bytes, then a 413.
    chunked = {**head, "Transfer-Encoding": "chunked"}
    piece = b"x" * (1 << 20)
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(40)) + b"0\r\n\r\n"
    statuses.append(_raw(url, "/v1/completions", chunked, body)[0])
    return statuses


def test_a_stream_runs_to_its_end_while_bad_requests_of_every_kind_arrive(app):
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stop": ["no-stop"], "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    gaps: list[float] = []
    result: dict = {}

    def stream():
        with post(app, "/v1/completions", body, stream=True) as response:
            last = time.monotonic()
            lines = []
            for line in response.iter_lines(decode_unicode=True):
                if line:
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
                    lines.append(line)
        result["lines"] = lines

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for(lambda: len(gaps) >= 3, 60, "the stream to start")
    with ThreadPoolExecutor(4) as pool:  # bad requests of every kind, four at a time, while it streams
        rounds = list(pool.map(lambda _: _bad_requests(app), range(4)))
    reader.join(120)
    assert all(set(r) <= {400, 401, 404, 413} for r in rounds), rounds
    lines = result["lines"]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), lines[-3:]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 200
    streamed = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    alone = post(app, "/v1/completions", {**body, "stream": False}).json()["choices"][0]["text"]
    assert streamed == alone  # greedy: what it would have said with no one else around
    assert max(gaps[1:]) < 10, max(gaps)  # never stalled behind a 40 MB body or anyone's tokenising


def test_slow_uploads_time_out_and_cannot_hold_the_ingress(app):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n").encode()  # fmt: skip
    conns = []
    for _ in range(100):
        conn = socket.create_connection(("127.0.0.1", int(app.rsplit(":", 1)[1])), timeout=30)
        conn.sendall(head + b"{")
        conns.append(conn)
    stop = threading.Event()

    def trickle():  # one more byte per connection every 0.2 s: never done within serve.body_timeout_s
        while not stop.wait(0.2):
            for conn in conns:
                with contextlib.suppress(OSError):  # answered 408 and closed by now
                    conn.sendall(b" ")

    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        time.sleep(1)
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            listed = requests.get(f"{app}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
            latencies.append(time.monotonic() - started)
            assert listed.status_code == 200
        answers = []
        for conn in conns:
            conn.settimeout(30)
            try:
                answers.append(conn.recv(4096).decode(errors="replace"))
            except OSError as err:
                answers.append(repr(err))
    finally:
        stop.set()
        feeder.join()
        for conn in conns:
            conn.close()
    assert max(latencies) < 1, latencies
    assert all(a.startswith("HTTP/1.1 408") for a in answers), [a for a in answers if " 408 " not in a][:3]
    assert any("serve.body_timeout_s" in a for a in answers)  # the message says which setting


def test_a_stream_read_slowly_holds_no_one_else(app):
    body = {"prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True}
    with post(app, "/v1/completions", body, stream=True) as slow:  # opened, then left unread for a while
        for _ in range(3):
            assert post(app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4}).status_code == 200
        time.sleep(2)
        chunks = events(slow)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_openai_client_sends_parts_developer_messages_n_and_seed(app):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{app}/v1", api_key=KEY, max_retries=0)
    parts = client.chat.completions.create(
        model="faq-a", max_tokens=5, temperature=0,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "GALAXY <"}, {"type": "text", "text": "what is ?"}]}],
    )  # fmt: skip
    plain = client.chat.completions.create(
        model="faq-a", max_tokens=5, temperature=0, messages=[{"role": "user", "content": "GALAXY <\nwhat is ?"}]
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content  # parts join with a newline

    def three(seed):
        reply = client.completions.create(model="faq-b", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=seed)
        assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage.prompt_tokens == 5  # counted once
        assert 3 <= reply.usage.completion_tokens <= 24  # every choice's tokens
        return [c.text for c in reply.choices]

    first, again, other = three(7), three(7), three(8)
    assert first == again and first != other and len(set(first)) > 1  # seeded per choice: reproducible, distinct
    streamed = client.chat.completions.create(
        model="faq-b", messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=1.0, n=2, seed=3,
        stream=True,
    )
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    whole = client.chat.completions.create(
        model="faq-b", messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=1.0, n=2, seed=3
    )
    assert texts == [c.message.content for c in whole.choices]
    assert client.models.retrieve("faq-a").id == "faq-a"
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="faq-a", messages=[{"role": "user", "content": PROMPT}], logprobs=True)
    nulls = {"prompt": PROMPT, "max_tokens": 4, "temperature": None, "top_p": None, "n": None, "stop": None,
             "stream": None, "seed": None, "logprobs": None, "user": "someone"}  # fmt: skip
    assert post(app, "/v1/completions", nulls).status_code == 200
    huge_seed = {"prompt": PROMPT, "max_tokens": 2, "temperature": 1.0, "seed": 2**64 + 5, "n": 2}
    assert post(app, "/v1/completions", huge_seed).status_code == 200  # any integer is a seed


def test_langchain_s_chat_model_works_unchanged(app):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{app}/v1", api_key=KEY, model="faq-a", temperature=0, max_tokens=5, max_retries=0)
    whole = chat.invoke([("system", "Be brief."), ("human", PROMPT)])
    assert isinstance(whole.content, str) and whole.usage_metadata["output_tokens"] <= 5
    streamed = "".join(chunk.content for chunk in chat.stream([("system", "Be brief."), ("human", PROMPT)]))
    assert streamed == whole.content


def test_a_damaged_registry_still_serves_what_is_whole(app, cluster):
    """Runs last: it damages the module's registry. A broken manifest and a best pointer whose adapter lost
    its files: the rest is listed and served, and only requests for the damaged adapters fail."""
    import shutil

    from qlora_ray.registry import Registry

    registry = cluster["registry"]
    for name, loss in (("faq-d", 3.0), ("faq-best", 0.5)):
        register_adapter(registry, name, cluster["base"], seed=4, val_loss=loss, staging=cluster["home"] / "more")
    assert Registry(str(registry)).best().name == "faq-best"
    (registry / "adapters" / "faq-d" / "manifest.json").write_text("{not json")
    shutil.rmtree(Registry(str(registry)).get("faq-best").uri)  # the pointer's adapter lost its files
    auth = {"Authorization": f"Bearer {KEY}"}
    models = requests.get(f"{app}/v1/models", headers=auth, timeout=10).json()["data"]
    assert {m["id"]: m["default"] for m in models} == {"faq-a": True, "faq-b": False}  # the best that remains
    reply = post(app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["model"] == "faq-a"
    for name in ("faq-d", "faq-best"):
        broken = post(app, "/v1/completions", {"prompt": PROMPT, "model": name})
        message = broken.json()["error"]["message"]
        assert broken.status_code == 404 and f"'{name}' is damaged" in message and str(registry) not in message


def _outside_address() -> str | None:
    """This machine's address on its network (not loopback), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent: this only picks the outgoing interface
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_without_keys_only_this_machine_is_answered_whatever_the_proxy_listens_on(app, cluster):
    """Runs last: it turns the keys off. The proxy listens on 0.0.0.0 (started so while keys were set); the app
    is redeployed without keys and with serve.host at its default, 127.0.0.1, so the check at build time passes:
    the ingress itself still refuses every client that is not on this machine."""
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no network address besides loopback")
    url = deploy(cluster).replace("0.0.0.0", "127.0.0.1")  # no keys
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 200  # this machine: served
    port = url.rsplit(":", 1)[1]
    remote = requests.get(f"http://{outside}:{port}/v1/models", timeout=10)
    assert remote.status_code == 403 and "serve.allow_unauthenticated" in remote.json()["error"]["message"]
    assert requests.post(f"http://{outside}:{port}/v1/completions", json={"prompt": PROMPT}, timeout=30).status_code == 403
