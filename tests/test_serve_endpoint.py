"""An endpoint one can expose: the API key, the body cap, decoding off the event loop, Prometheus metrics, many
clients that go away, and vLLM's chat-template fields.

The real server is `idefics-jax serve --model tiny-shapes` in a subprocess on 127.0.0.1 with a key (from the
environment) and a 1 MB body cap; the event-loop and metrics-hook tests run the app in-process over a stub engine
(no model).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from idefics_jax.generation.chat import Chat
from idefics_jax.serve import app as app_module
from idefics_jax.serve.guard import exposed
from test_serve import (EXAMPLES, QUESTIONS, cdp, free_port, openai_messages, read_events, solo, solo_text,
                        wait_for)

KEY = "test-key-7f3a"


def call(url: str, path: str, body=None, key: str | None = KEY, timeout: float = 120) -> tuple[int, bytes, dict]:
    """(status, body bytes, headers with lower-case names) of a GET (body None) or a JSON POST."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, program_env):
    """The server with an API key (IDEFICS_JAX_API_KEY), --max-body-mb 1, 8 slots and room for 64 waiting; XLA's
    quick CPU backend (each prefill batch size compiles once)."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w+")
    cmd = [sys.executable, "-m", "idefics_jax.cli", "serve", "--model", "tiny-shapes", "--port", str(port),
           "--slots", "8", "--max-queue", "64", "--max-body-mb", "1"]
    env = {**os.environ, **program_env, "IDEFICS_JAX_API_KEY": KEY}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400  # a loaded machine
        while True:
            try:
                call(url, "/health", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the server did not start:\n{log.read()[-3000:]}")
                time.sleep(0.5)
        yield collections.namedtuple("Guarded", "url port proc log")(url, port, proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def tiny_chat():
    return Chat.load("tiny-shapes")


def test_the_api_key_is_needed_except_for_health_and_the_page(guarded, tiny_chat):
    """Without the key or with a wrong one: 401 (with WWW-Authenticate) on the API and /metrics; /health and the
    chat page stay open; the official client with the key is answered."""
    import openai

    good = {"model": "tiny-shapes", "messages": openai_messages(*QUESTIONS[0]), "temperature": 0, "max_tokens": 4}
    for key in (None, "wrong-key", KEY + "x", ""):
        for path, body in (("/v1/chat/completions", good), ("/v1/models", None), ("/metrics", None)):
            code, out, headers = call(guarded.url, path, body, key=key)
            assert code == 401, (key, path, out)
            assert "API key" in json.loads(out)["error"]["message"] and headers["www-authenticate"] == "Bearer"
    assert call(guarded.url, "/health", key=None)[0] == 200
    code, page, _ = call(guarded.url, "/", key=None)
    assert code == 200 and b"Authorization" in page
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    r = client.chat.completions.create(**good)
    assert r.choices[0].message.content == solo_text(tiny_chat, *QUESTIONS[0], 4)[0]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def upload(port: int, total_mb: int, chunked: bool) -> tuple[bytes, dict]:
    """POSTs a body of `total_mb` MB (declared in Content-Length, or chunked), sending from a thread while this one
    reads the response; returns the response's head (status line and headers) and its JSON body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    framing = b"Transfer-Encoding: chunked" if chunked else f"Content-Length: {total_mb << 20}".encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\n".encode() + framing + b"\r\n\r\n")
    mb = b" " * (1 << 20)
    piece = b"100000\r\n" + mb + b"\r\n" if chunked else mb

    def send():
        try:
            for _ in range(total_mb):
                sock.sendall(piece)
        except OSError:  # the server answered and closed: the rest is never sent
            pass

    sender = threading.Thread(target=send)
    sender.start()
    try:
        f = sock.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = f.readline()
            assert line, f"the connection closed before a response: {head!r}"
            head += line
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        return head, json.loads(f.read(length))
    finally:
        with contextlib.suppress(OSError):  # already reset by the server
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        sender.join(60)
        assert not sender.is_alive()


def test_a_body_over_the_cap_gets_413_without_being_read(guarded, tiny_chat):
    """A 256 MB body, declared or chunked, against a 1 MB cap: 413 at once, and the server's resident memory does
    not grow by anything like the body (the declared one is not read at all, the chunked one only up to the cap).
    A body under the cap is answered."""
    before = rss_mb(guarded.proc.pid)
    for chunked in (False, True, False, True):
        head, out = upload(guarded.port, 256, chunked)
        assert head.startswith(b"HTTP/1.1 413"), head
        assert out["error"]["message"] == "the request body is over the limit of 1 MB (--max-body-mb)"
    grown = rss_mb(guarded.proc.pid) - before
    print(f"server RSS {before:.0f} MB before, grown by {grown:.1f} MB over four 256 MB uploads")
    assert grown < 32, f"the server grew by {grown:.0f} MB over four 256 MB uploads"
    body = {"model": "tiny-shapes", "messages": openai_messages(*QUESTIONS[1]), "temperature": 0, "max_tokens": 4,
            "user": " " * 900_000}  # just under 1 MB in all
    code, out, _ = call(guarded.url, "/v1/chat/completions", body)
    assert code == 200
    assert json.loads(out)["choices"][0]["message"]["content"] == solo_text(tiny_chat, *QUESTIONS[1], 4)[0]


def open_stream(port: int, body: dict) -> tuple[socket.socket, object]:
    data = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)  # queued behind compiles
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    f = sock.makefile("rb")
    status = f.readline()
    assert b"200" in status, status
    while f.readline() not in (b"\r\n", b""):
        pass
    return sock, f


def test_64_streams_half_go_away_mid_answer(guarded, tiny_chat):
    """64 concurrent streaming clients over 8 slots; 32 hang up after their first piece of a long answer: no slot or
    queue entry or prefix-cache block stays held (/health returns to zero), and the other 32 get `generate`'s
    answers in full."""
    jobs = [(QUESTIONS[i % 4], i % 2 == 0) for i in range(64)]  # (question about shapes-1.png, leaves)
    want = {q: solo_text(tiny_chat, *q, 8)[0] for q in QUESTIONS[:4]}
    before = guarded_stats(guarded)

    def client(job):
        q, leaves = job
        body = {"model": "tiny-shapes", "messages": openai_messages(*q), "temperature": 0,
                "max_tokens": 400 if leaves else 8, "ignore_eos": leaves}
        sock, f = open_stream(guarded.port, body)
        try:
            if leaves:
                read_events(f, 2)  # the role chunk and a first piece: the answer is running
                return None
            events = read_events(f, 10_000)
            assert events[-1] == "[DONE]"
            return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                           if json.loads(e)["choices"])
        finally:
            f.close()
            sock.close()

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(client, jobs))
    for (q, leaves), text in zip(jobs, got):
        if not leaves:
            assert text == want[q], q
    wait_for(lambda: (lambda h: h["active"] == 0 and h["waiting"] == 0)(json.loads(call(guarded.url, "/health")[1])),
             60)
    health = json.loads(call(guarded.url, "/health")[1])
    assert health["pinned_blocks"] == 0  # the server's prefix cache (on by default) holds no block for anyone
    after = health["stats"]
    assert after["prefix_cache_queries"] > after["prefix_cache_hits"] > 0  # the repeated questions hit
    assert after.get("cancelled", 0) - before.get("cancelled", 0) == 32
    assert after["finished"] - before.get("finished", 0) == 32


def guarded_stats(guarded) -> dict:
    return json.loads(call(guarded.url, "/health")[1])["stats"]


def test_metrics_parse_with_prometheus_client(guarded):
    """/metrics is Prometheus text that prometheus_client parses: request, token and finish counters, the queue,
    and time-to-first-token and inter-token latency histograms that saw the requests."""
    from prometheus_client.parser import text_string_to_metric_families

    body = {"model": "tiny-shapes", "messages": openai_messages(*QUESTIONS[2]), "temperature": 0, "max_tokens": 5,
            "ignore_eos": True}
    assert call(guarded.url, "/v1/chat/completions", body)[0] == 200
    assert call(guarded.url, "/v1/chat/completions", body, key="nope")[0] == 401
    code, text, headers = call(guarded.url, "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    get = lambda name, **labels: samples.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
    assert get("idefics_jax_http_requests_total", code="200") >= 1
    assert get("idefics_jax_http_requests_total", code="401") >= 1
    assert get("idefics_jax_requests_finished_total", reason="length") >= 1
    assert get("idefics_jax_generation_tokens_total") >= 5 and get("idefics_jax_prompt_tokens_total") > 36
    assert get("idefics_jax_time_to_first_token_seconds_count") >= 1
    assert get("idefics_jax_inter_token_latency_seconds_count") >= 1
    assert get("idefics_jax_time_to_first_token_seconds_bucket", le="+Inf") == \
        get("idefics_jax_time_to_first_token_seconds_count")
    assert ("idefics_jax_requests_waiting", ()) in samples and get("idefics_jax_slots") == 8
    # `serve` keeps a prefix and an image cache by default: every prompt token was looked up in the prefix cache.
    queries = get("idefics_jax_cache_queries_total", cache="prefix")
    assert queries >= get("idefics_jax_prompt_tokens_total") > 0
    assert 0 <= get("idefics_jax_cache_hits_total", cache="prefix") <= queries


def test_continue_final_message_as_vllm(guarded, tiny_chat):
    """vLLM's fields: continue_final_message continues the final assistant message (the answer is `generate`'s
    after it); by default it is closed and a new turn opened (a longer prompt); both true is a 400."""
    text, image = QUESTIONS[0]
    messages = openai_messages(text, image) + [{"role": "assistant", "content": "The answer is"}]
    base = {"model": "tiny-shapes", "messages": messages, "temperature": 0, "max_tokens": 5, "ignore_eos": True}
    code, out, _ = call(guarded.url, "/v1/chat/completions",
                        {**base, "continue_final_message": True, "add_generation_prompt": False})
    assert code == 200, out
    out = json.loads(out)
    ours = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": "The answer is"}]
    want = solo(tiny_chat, ours, [os.path.join(EXAMPLES, image)], 5, eos_token_id=[])
    assert out["choices"][0]["message"]["content"] == tiny_chat.processor.tokenizer.decode(want,
                                                                                          skip_special_tokens=True)
    code, closed, _ = call(guarded.url, "/v1/chat/completions", base)
    assert code == 200
    assert json.loads(closed)["usage"]["prompt_tokens"] > out["usage"]["prompt_tokens"]
    code, err, _ = call(guarded.url, "/v1/chat/completions",
                        {**base, "continue_final_message": True, "add_generation_prompt": True})
    assert code == 400 and "cannot set both" in json.loads(err)["error"]["message"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_chat_page_gets_the_key(guarded, tiny_chat, tmp_path):
    """The chat page on a keyed server, in headless Chromium: opened as /#key=KEY it takes the key (and drops it
    from the address); without a stored key it shows the key form, and with the key typed in it loads the model
    and answers a question about an image as `generate` does."""
    text, image = QUESTIONS[6]
    want, _ = solo_text(tiny_chat, text, image, 256)
    port = free_port()
    chrome = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ws = None
    try:
        def targets():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as r:
                    return [t for t in json.load(r) if t["type"] == "page"]
            except OSError:
                return []
        wait_for(targets, 60)
        ws, cdp_call = cdp(targets()[0]["webSocketDebuggerUrl"])
        cdp_call("Page.enable")
        js = lambda code: cdp_call("Runtime.evaluate", expression=code, returnByValue=True)["result"].get("value")  # noqa: E731
        model = "document.getElementById('model').textContent"
        cdp_call("Page.navigate", url=guarded.url + "/#key=" + KEY)
        wait_for(lambda: js(model) == "tiny-shapes")
        assert js("location.hash") == "" and js("localStorage.getItem('idefics-jax-key')") == KEY
        js("localStorage.clear(); true")
        cdp_call("Page.reload")
        wait_for(lambda: js("document.readyState") == "complete" and
                 js("getComputedStyle(document.getElementById('keyform')).display") == "flex")
        assert js(model) == ""
        js(f"document.getElementById('key').value = {json.dumps(KEY)};"
           "document.querySelector('#keyform button').click(); true")
        wait_for(lambda: js(model) == "tiny-shapes")
        root = cdp_call("DOM.getDocument")["root"]["nodeId"]
        node = cdp_call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        cdp_call("DOM.setFileInputFiles", nodeId=node, files=[os.path.join(EXAMPLES, image)])
        wait_for(lambda: js("document.getElementById('preview').src.startsWith('data:image/png')"))
        js(f"document.getElementById('question').value = {json.dumps(text)};"
           "document.getElementById('send').click(); true")
        wait_for(lambda: js("(document.querySelector('.assistant, .error') || {}).dataset?.state") in ("done", "error"),
                 300)
        assert js("document.querySelector('.assistant, .error').textContent") == want
    finally:
        if ws is not None:
            ws.close()
        chrome.terminate()
        try:
            chrome.wait(20)
        except subprocess.TimeoutExpired:
            chrome.kill()
            chrome.wait()


# ---------------------------------------------------------------------------------------------------------------
# In-process, over a stub engine


class StubEngine:
    slots = 2

    def __init__(self):
        self.stats = collections.Counter()

    def start(self):
        return self

    def stop(self, timeout=30.0):
        pass

    def load(self):
        return {"active": 0, "waiting": 0}

    def submit(self, request, on_event=None, wait=False):
        raise ValueError("the stub engine takes no requests")


@pytest.fixture
def stub_server():
    """The app over a StubEngine, served by uvicorn on a thread of this process; yields (url, engine)."""
    import uvicorn

    engine = StubEngine()
    app = app_module.create_app(engine, "stub", allow_local_images=EXAMPLES)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30)
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(30)


def test_images_are_decoded_off_the_event_loop(stub_server, monkeypatch):
    """While an image decode is stuck, the server still answers /health: decoding runs on the pool, not the loop."""
    url, _ = stub_server
    entered, release = threading.Event(), threading.Event()
    decode = app_module.decode_image

    def stuck(*a, **kw):
        entered.set()
        assert release.wait(60)
        return decode(*a, **kw)

    monkeypatch.setattr(app_module, "decode_image", stuck)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "shapes-1.png"}},
                                                       {"type": "text", "text": "hi"}]}]}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, url, "/v1/chat/completions", body, None)
        assert entered.wait(30)
        assert call(url, "/health", key=None, timeout=10)[0] == 200  # the loop is free
        assert not pending.done()
        release.set()
        code, out, _ = pending.result(60)
    assert code == 400 and "stub engine" in json.loads(out)["error"]["message"]  # decoded, then submitted


def test_caches_counted_by_the_engine_appear_in_metrics(stub_server):
    """The hook for caches: counts under stats["NAME_cache_queries"] / ["NAME_cache_hits"] appear as counters and
    a hit rate."""
    from prometheus_client.parser import text_string_to_metric_families

    url, engine = stub_server
    engine.stats.update(prefix_cache_queries=200, prefix_cache_hits=150, image_cache_queries=4, image_cache_hits=1)
    code, text, _ = call(url, "/metrics", key=None)
    assert code == 200
    values = {(s.name, s.labels.get("cache")): s.value for f in text_string_to_metric_families(text.decode())
              for s in f.samples}
    assert values[("idefics_jax_cache_hit_rate", "prefix")] == 0.75
    assert values[("idefics_jax_cache_hit_rate", "image")] == 0.25
    assert values[("idefics_jax_cache_queries_total", "prefix")] == 200
    assert values[("idefics_jax_cache_hits_total", "image")] == 1


@pytest.mark.parametrize("host, out", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                       ("127.0.0.2", False), ("0.0.0.0", True), ("::", True), ("10.1.2.3", True),
                                       ("my-tpu-vm", True)])
def test_listening_beyond_loopback_is_exposed(host, out):
    assert exposed(host) == out
