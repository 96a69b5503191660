"""Serving: the continuous-batching engine against `generate`, and the OpenAI-compatible server on loopback.

The engine runs in-process on a random model whose greedy answers run long (so the cache ring wraps and slots
free and refill at different times). The server is `idefics-jax serve --model tiny-shapes` in a subprocess on
127.0.0.1, driven by the official `openai` client, raw HTTP and headless Chromium; it is stopped with SIGTERM by
the last test (and killed by the fixture if anything is left).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

import programs

from idefics_jax.checkpoints.checkpoint import quantized_format
from idefics_jax.checkpoints.registry import resolve
from idefics_jax.generation import decode as _decode
from idefics_jax.generation.api import generate
from idefics_jax.generation.chat import Chat, user_turn
from idefics_jax.generation.sampling import SamplingParams
from idefics_jax.ops import attention as _attention
from idefics_jax.ops.quantize import QuantizedWeight
from idefics_jax.serve import slots
from idefics_jax.serve.engine import Engine, EngineStopped, QueueFull, Request
from reference import random_image

# ---------------------------------------------------------------------------------------------------------------
# The engine, in-process


@pytest.fixture(scope="module")
def lively_chat(lively_hf):
    return Chat.load(lively_hf)


def solo(chat: Chat, messages, images, max_tokens: int, **kw) -> list[int]:
    """`generate` on one request alone: its new tokens up to and including the first eos."""
    inputs = chat.inputs(messages, images)
    new = generate(chat.model, **inputs, max_new_tokens=max_tokens, **kw)[0, inputs["input_ids"].shape[1]:]
    eos = kw.get("eos_token_id", chat.model.generation_defaults.eos_token_ids)
    ends = [i for i, t in enumerate(new) if t in (eos or ())]
    return new[:ends[0] + 1 if ends else len(new)].tolist()


def lively_prompts(seed: int = 0) -> list[tuple[list[dict], list | None]]:
    """Four text prompts and two with a 40 x 40 image: two prompt shapes only (few compiles)."""
    rng = np.random.default_rng(seed)
    texts = ["what is this", "why the dots", "show the red", "many kinds of", "blue or what", "tree and sky"]
    return [(user_turn(t, int(i >= 4)), [random_image(rng, 40, 40)] if i >= 4 else None)
            for i, t in enumerate(texts)]


def lively_requests(n: int, seed: int = 0) -> list[Request]:
    """n requests over `lively_prompts`, max_tokens 2-39 (2-15 with an image: a bucket of 160 columns)."""
    rng = np.random.default_rng(seed)
    prompts = lively_prompts(seed)
    out = []
    for i in range(n):
        messages, images = prompts[i % len(prompts)]
        out.append(Request(messages, images, max_tokens=int(rng.integers(2, 16 if images else 40))))
    return out


def test_prefill_many_batches_greedy_prompts(lively_chat):
    """Greedy prompts of one bucket and image shape prefill as one batch (rows of one cache), sampled ones alone;
    each row's first token and keys are those of its prompt prefilled alone."""
    dec = slots.SlotDecoder(lively_chat.model, slots=4, max_len=176)
    prompts = lively_prompts()
    inputs = [lively_chat.inputs(m, i) for m, i in prompts]
    opts = [dict(sampling=SamplingParams(max_new_tokens=5))] * 5 + [
        dict(sampling=SamplingParams(max_new_tokens=5, do_sample=True, temperature=0.7, seed=3))]
    prepared = [dec.prepare(**x, **o) for x, o in zip(inputs, opts)]
    many = dec.prefill_many(prepared)
    assert [p.row for p in many] == [0, 1, 2, 3, 0, 0]
    assert all(p.cache is many[0].cache for p in many[:4]) and many[4].cache is not many[5].cache
    for x, o, pre in zip(inputs, opts, many):
        alone = dec.prefill(**x, **o)
        assert (pre.first, pre.done) == (alone.first, alone.done)
        np.testing.assert_array_equal(pre.mask_T, alone.mask_T)
        k0 = lambda c: np.asarray(c.k[0]) if isinstance(c.k, list) else np.asarray(c.k)[0]  # noqa: E731
        np.testing.assert_allclose(k0(pre.cache)[pre.row], k0(alone.cache)[0], rtol=1e-5, atol=1e-5)


def test_engine_greedy_answers_are_generates(lively_chat):
    """40 requests through 3 slots of a 176-column ring (it wraps; slots free and refill at different steps):
    each request's tokens are `generate`'s for it alone."""
    reqs = lively_requests(40)
    with Engine(lively_chat.model, lively_chat, slots=3, max_len=176, steps=3) as engine:
        handles = [engine.submit(r, wait=True) for r in reqs]
        results = [h.result(timeout=300) for h in handles]
        assert int(engine.decoder.state.t) > 176
    # Greedy answers to a prompt are prefixes of its longest one: one `generate` per prompt.
    longest = {}
    for r in reqs:
        longest[id(r.messages)] = max(longest.get(id(r.messages), (0,)), (r.max_tokens, r))
    full = {k: (m, solo(lively_chat, r.messages, r.images, m)) for k, (m, r) in longest.items()}
    lengths = set()
    for r, res in zip(reqs, results):
        want = full[id(r.messages)][1][:r.max_tokens]
        assert res.tokens == want
        assert res.text == lively_chat.processor.tokenizer.decode(want, skip_special_tokens=True)
        assert res.finish_reason == ("length" if len(want) == r.max_tokens and want[-1] not in
                                     lively_chat.model.generation_defaults.eos_token_ids else "stop")
        lengths.add(len(res.tokens))
    assert len(lengths) >= 4  # the answers really had different lengths


def test_engine_serves_a_quantized_model(lively_hf):
    """An int4 model (quantized while loading) through the engine: the slots run the same quantized layers, so each
    request's greedy tokens are `generate`'s on that model alone."""
    chat = Chat.load(lively_hf, quantize="int4")
    assert quantized_format(chat.model) == "int4"
    reqs = lively_requests(6, seed=2)  # each prompt once, 2 slots: they free and refill
    with Engine(chat.model, chat, slots=2, max_len=176, steps=3) as engine:
        weights = engine.decoder.core.layers.weights  # on the CPU: per-layer views of the codes
        assert isinstance((weights[0] if isinstance(weights, list) else weights)["q"], QuantizedWeight)  # no copy
        results = [h.result(timeout=300) for h in [engine.submit(r, wait=True) for r in reqs]]
    # Greedy answers are prefixes of longer ones: one `generate` length for all (fewer compiles).
    longest = max(r.max_tokens for r in reqs)
    for r, res in zip(reqs, results):
        assert res.tokens == solo(chat, r.messages, r.images, longest)[:r.max_tokens]
    assert len({tuple(res.tokens) for res in results}) >= 3  # the prompts got different answers


def test_engine_sampling_is_generates(lively_chat):
    """Sampled answers (temperature, top_p, seed per request) are those of `generate(do_sample=True)` alone."""
    base = lively_requests(3, seed=1)
    reqs = [Request(r.messages, r.images, max_tokens=12, temperature=t, top_p=p, seed=s)
            for r, t, p, s in zip(base, (0.7, 1.3, 0.9), (0.8, 0.95, 0.5), (1, 2, 3))]
    with Engine(lively_chat.model, lively_chat, slots=2, max_len=192) as engine:
        results = [h.result(timeout=300) for h in [engine.submit(r) for r in reqs]]
    for r, res in zip(reqs, results):
        want = solo(lively_chat, r.messages, r.images, 12, do_sample=True, temperature=r.temperature,
                    top_p=r.top_p, seed=r.seed)
        assert res.tokens == want


def test_engine_prompts_use_the_models_attention_backend(lively_chat, monkeypatch):
    """The backend set on the model (`set_attention`) reaches the package's one attention entry point for the
    prompt (a structured Mask to the backend named), and the answers stay `generate`'s; an unknown backend is
    refused up front."""
    seen = set()

    def spy(q, k, v, mask, backend=None, partitioning=None):
        seen.add((type(mask).__name__, backend))
        return attend(q, k, v, mask, backend, partitioning)

    attend = _attention.attend
    monkeypatch.setattr(_attention, "attend", spy)
    reqs = lively_requests(2, seed=2)
    model = lively_chat.model
    try:
        model.set_attention("cudnn")
        with Engine(model, lively_chat, slots=2, max_len=96) as engine:
            results = [h.result(timeout=300) for h in [engine.submit(r) for r in reqs]]
    finally:
        model.set_attention(None)
    assert ("Mask", "cudnn") in seen  # the prompt, as a structured mask
    assert {b for _, b in seen} == {"cudnn"}  # decode steps too (their dense column masks take the einsum path)
    monkeypatch.setattr(_attention, "attend", attend)
    for r, res in zip(reqs, results):
        assert res.tokens == solo(lively_chat, r.messages, r.images, r.max_tokens)
    with pytest.raises(ValueError, match="attention backend 'flash'"):
        model.set_attention("flash")


def test_generate_and_the_engine_share_the_decode_core(lively_chat, monkeypatch):
    """`generate` and the engine run the same prefill, insert, decode loop and decode step (`generation.decode`),
    and give the same greedy tokens."""
    import collections

    import jax

    calls, who = collections.Counter(), ["generate"]

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name, who[0]] += 1
            return fn(*a, **k)
        return wrapped

    for name in ("prefill", "insert", "decode", "step"):
        monkeypatch.setattr(_decode, name, spy(name, getattr(_decode, name)))
    r = lively_requests(1, seed=4)[0]
    jax.clear_caches()  # the loops trace again, so the step inside them is seen
    want = solo(lively_chat, r.messages, r.images, r.max_tokens)
    who[0] = "engine"
    jax.clear_caches()
    with Engine(lively_chat.model, lively_chat, slots=2, max_len=96) as engine:
        got = engine.submit(r).result(timeout=300).tokens
    assert got == want
    for w in ("generate", "engine"):
        assert all(calls[name, w] >= 1 for name in ("prefill", "insert", "decode", "step")), calls


def test_engine_steady_state_does_not_recompile(lively_chat):
    """Once a prompt bucket has been seen, more requests of that bucket (any slot, any length, any sampling
    values) compile nothing: prefill, insert and decode keep their jit cache sizes."""
    def req(text, max_tokens, temperature=0.0):
        return Request(user_turn(text), None, max_tokens=max_tokens, temperature=temperature, seed=5)

    sizes = lambda: (_decode.prefill._cache_size(), _decode.insert._cache_size(),  # noqa: E731
                     _decode.decode._cache_size(), _decode.release._cache_size())
    with Engine(lively_chat.model, lively_chat, slots=2, max_len=96) as engine:
        engine.answer_all([req("what is this", 5), req("why the dots", 3, 0.8)])
        h = engine.submit(req("show the red", 60))
        h.cancel()
        h.result(timeout=60)
        before = sizes()
        engine.answer_all([req(t, m, temp) for t, m, temp in  # same prompt length, other texts and values
                           [("many kinds o", 7, 0.0), ("blue or what", 20, 0.5), ("tree and sky", 2, 1.5),
                            ("count things", 11, 0.0), ("the big blue", 30, 0.9)]])
        assert sizes() == before


def test_engine_stream_stop_cancel_and_queue(lively_chat):
    """Streamed pieces add up to the text; a stop string cuts it; cancel frees the slot; a full queue raises
    QueueFull; bad requests raise ValueError naming the problem; a stopped engine refuses work."""
    tok = lively_chat.processor.tokenizer
    r = lively_requests(1, seed=3)[0]
    r.max_tokens, r.ignore_eos = 30, True
    want = solo(lively_chat, r.messages, r.images, 30, eos_token_id=[])
    text = tok.decode(want, skip_special_tokens=True)
    engine = Engine(lively_chat.model, lively_chat, slots=1, max_len=1024, max_queue=1).start()
    try:
        h = engine.submit(r)
        assert "".join(h) == text == h.result().text
        assert h.result().finish_reason == "length" and h.result().completion_tokens == 30
        stop = text[len(text) // 2:len(text) // 2 + 2]
        cut = engine.submit(Request(r.messages, r.images, max_tokens=30, stop=[stop], ignore_eos=True)).result()
        assert cut.text == text[:text.find(stop)] and cut.finish_reason == "stop"

        long = engine.submit(Request(r.messages, r.images, max_tokens=990, ignore_eos=True))
        next(iter(long))  # running
        queued = engine.submit(Request(r.messages, r.images, max_tokens=3))
        with pytest.raises(QueueFull, match="max_queue 1"):
            engine.submit(Request(r.messages, r.images, max_tokens=3))
        long.cancel()
        assert long.result(timeout=60).finish_reason == "cancelled"
        assert long.result().completion_tokens < 990
        assert queued.result(timeout=60).tokens == want[:3]
        for bad, msg in [(dict(max_tokens=0), "max_tokens must be a positive integer"),
                         (dict(max_tokens=10_000), "max_tokens 10000 is too large"),
                         (dict(temperature=-1.0), "temperature must be"),
                         (dict(top_p=0.0), "top_p must be in"),
                         (dict(messages=user_turn("what", 1)), "1 image entries but 0 images")]:
            with pytest.raises(ValueError, match=msg):
                engine.submit(Request(**{"messages": r.messages, "images": r.images, "max_tokens": 3, **bad}))
    finally:
        engine.stop()
    with pytest.raises(EngineStopped):
        engine.submit(r)


# ---------------------------------------------------------------------------------------------------------------
# The server: `idefics-jax serve --model tiny-shapes` in a subprocess

EXAMPLES = os.path.join(resolve("tiny-shapes"), "examples")
QUESTIONS = [(q["text"], e["image"]) for e in json.load(open(os.path.join(EXAMPLES, "questions.json")))
             for q in e["questions"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log):
        self.port, self.proc, self.log = port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def post(self, body, raw: bool = False) -> tuple[int, dict, dict]:
        data = body if raw else json.dumps(body).encode()
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.load(r), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e), dict(e.headers)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w+")
    cmd = [sys.executable, "-m", "idefics_jax.cli", "serve", "--model", "tiny-shapes", "--port", str(port),
           "--slots", "4", "--max-queue", "16", "--max-images", "2", "--max-image-pixels", "40000",
           "--allow-local-images", EXAMPLES]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    s = Server(port, proc, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                s.get("/health")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the server did not start:\n{log.read()[-3000:]}")
                time.sleep(0.5)
        yield s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def tiny_chat():
    return Chat.load("tiny-shapes")


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def openai_messages(text: str, image: str | None) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": data_url(os.path.join(EXAMPLES, image))}}] if image else []
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def solo_text(chat: Chat, text: str, image: str, max_tokens: int, ignore_eos: bool = False) -> tuple[str, int]:
    kw = dict(eos_token_id=[]) if ignore_eos else {}
    tokens = solo(chat, user_turn(text, 1), [os.path.join(EXAMPLES, image)], max_tokens, **kw)
    return chat.processor.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def test_openai_client_streaming_and_not(server, tiny_chat):
    """The official client, streaming and not: the answers are `generate`'s for the same question and image,
    with usage counts; models and health answer."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list()] == ["tiny-shapes"]
    for (text, image), ignore_eos in [(QUESTIONS[0], False), (QUESTIONS[5], False), (QUESTIONS[10], True)]:
        want, n = solo_text(tiny_chat, text, image, 6, ignore_eos)
        kw = dict(model="tiny-shapes", messages=openai_messages(text, image), temperature=0, max_tokens=6,
                  extra_body={"ignore_eos": ignore_eos})
        r = client.chat.completions.create(**kw)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == ("length" if ignore_eos else "stop")
        assert r.usage.completion_tokens == n and r.usage.prompt_tokens > 36  # the image's 36 tokens and the text
        assert r.usage.total_tokens == r.usage.prompt_tokens + n
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(pieces) == want and len([p for p in pieces if p]) >= 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == n
    assert want != solo_text(tiny_chat, text, image, 6)[0]  # ignore_eos changed the answer: it was tested
    # A local path under --allow-local-images works as the data URL does.
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": QUESTIONS[0][1]}},
                                          {"type": "text", "text": QUESTIONS[0][0]}]}]
    r = client.chat.completions.create(model="tiny-shapes", messages=local, temperature=0, max_tokens=6)
    assert r.choices[0].message.content == solo_text(tiny_chat, *QUESTIONS[0], 6)[0]


def test_load_64_requests_16_clients(server, tiny_chat):
    """64 requests from 16 concurrent clients, mixed answer lengths (1-24 tokens; eos ignored on half): all
    succeed and each greedy answer is its solo `generate`'s (solo answers: one generate per question and image
    at the longest length, cut)."""
    import openai

    rng = np.random.default_rng(0)
    jobs = [(QUESTIONS[int(rng.integers(len(QUESTIONS)))], int(rng.integers(1, 25)), bool(i % 2)) for i in range(64)]
    longest = {}
    for (q, m, ig) in jobs:
        longest[(q, ig)] = max(longest.get((q, ig), 0), m)
    full = {}
    for (q, ig), m in longest.items():
        kw = dict(eos_token_id=[]) if ig else {}
        full[(q, ig)] = solo(tiny_chat, user_turn(q[0], 1), [os.path.join(EXAMPLES, q[1])], m, **kw)
    tok = tiny_chat.processor.tokenizer

    def ask(job):
        (text, image), m, ig = job
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="tiny-shapes", messages=openai_messages(text, image),
                                           temperature=0, max_tokens=m, extra_body={"ignore_eos": ig})
        return r.choices[0].message.content, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, jobs))
    lengths = set()
    for (q, m, ig), (text, n) in zip(jobs, got):
        want = full[(q, ig)][:m]
        assert (text, n) == (tok.decode(want, skip_special_tokens=True), len(want)), (q, m, ig)
        lengths.add(n)
    assert len(lengths) >= 10
    health = server.get("/health")
    assert health["active"] == 0 and health["waiting"] == 0


def png(width: int, height: int) -> bytes:
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_requests_get_one_line_errors(server, tiny_chat):
    """Each bad request gets its status and a one-line message naming the problem; good requests sent at the
    same time are answered as usual."""
    good = openai_messages(*QUESTIONS[1])
    img = {"type": "image_url", "image_url": {"url": data_url(os.path.join(EXAMPLES, QUESTIONS[1][1]))}}
    big = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png(300, 200)).decode()}}
    text_part = {"type": "text", "text": "What shape?"}
    cases = [
        (b'{"model": "tiny-shapes", "messages": [', 400, "malformed JSON"),
        ({"model": "gpt-4o", "messages": good}, 404, "model 'gpt-4o' not found"),
        ({"messages": [{"role": "user", "content": [img, img, img, text_part]}]}, 400, "too many images: 3"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()}}, text_part]}]},
         400, "image 1: not a decodable image"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                                                     text_part]}]}, 400, "not valid base64"),
        ({"messages": [{"role": "user", "content": [big, text_part]}]}, 413, "300 x 200 is over the limit"),
        ({"messages": good, "max_tokens": -5}, 400, "max_tokens must be a positive integer; got -5"),
        ({"messages": good, "max_tokens": 10**9}, 400, "max_tokens 1000000000 is too large"),
        ({"messages": [{"role": "user", "content": "square " * 1100}]}, 400, "the prompt has"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}},
                                                     text_part]}]}, 400, "outside the allowed image directory"),
        ({"messages": "hello"}, 400, "messages must be a non-empty list"),
        ({"messages": good, "temperature": "hot"}, 400, "temperature must be a number"),
    ]
    want, _ = solo_text(tiny_chat, *QUESTIONS[1], 4)

    def good_one(_):
        return server.post({"model": "tiny-shapes", "messages": good, "temperature": 0, "max_tokens": 4})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        goods = pool.map(good_one, range(6))
        for body, status, msg in cases:
            code, out, _ = server.post(body, raw=isinstance(body, bytes))
            assert code == status, (msg, out)
            m = out["error"]["message"]
            assert msg in m and "\n" not in m, m
        for code, out, _ in goods:
            assert code == 200 and out["choices"][0]["message"]["content"] == want
    assert server.get("/health")["status"] == "ok"


def open_stream(server, body) -> tuple[socket.socket, io.BufferedReader]:
    """A raw streaming request; returns the socket and a reader positioned at the body."""
    data = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    f = sock.makefile("rb")
    assert b"200" in f.readline()
    while f.readline() not in (b"\r\n", b""):
        pass
    return sock, f


def read_events(f, n: int) -> list[str]:
    """The next n SSE data payloads (chunked transfer framing skipped)."""
    out = []
    while len(out) < n:
        line = f.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            out.append(line[6:].strip().decode())
    return out


def wait_for(pred, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_structured_outputs(server, tiny_chat):
    """vLLM's structured_outputs / guided_choice / guided_regex constrain the answer (streamed too); a format
    tiny-shapes' words cannot write, or a bad regex, gets a 400 with one line."""
    text, image = QUESTIONS[0]
    messages = openai_messages(text, image)
    for extra in [{"structured_outputs": {"choice": ["circle", "square", "red"]}},
                  {"guided_choice": ["circle", "square", "red"], "temperature": 1.0, "seed": 2},
                  {"guided_regex": "(red|blue|circle)"}]:
        status, body, _ = server.post({"messages": messages, "max_tokens": 8, **extra})
        assert status == 200, body
        answer = body["choices"][0]["message"]["content"]
        assert body["choices"][0]["finish_reason"] == "stop"
        if "guided_regex" in extra:
            assert re.fullmatch("(red|blue|circle)", answer), answer
        else:
            assert answer in ("circle", "square", "red")
    for extra, message in [
            ({"response_format": {"type": "json_object"}}, "response_format: JSON object: this tokenizer has no token "
                                                           "that can start such an answer"),
            ({"guided_regex": "(("}, "response_format: invalid regex:"),
            ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "ask for one response format")]:
        status, body, _ = server.post({"messages": messages, "max_tokens": 8, **extra})
        assert status == 400 and body["error"]["message"].startswith(message), body
        assert "\n" not in body["error"]["message"]


def test_full_queue_429_and_disconnect_frees_slots(server, tiny_chat):
    """4 long answers fill the 4 slots and 16 more the queue: the next request gets 429 with Retry-After.
    Clients that disconnect cancel their requests: slots and queue empty at once and the server answers."""
    long = {"model": "tiny-shapes", "messages": openai_messages(*QUESTIONS[2]), "temperature": 0,
            "max_tokens": 900, "ignore_eos": True}
    before = server.get("/health")["stats"].get("cancelled", 0)
    streams = [open_stream(server, long) for _ in range(4)]
    for _, f in streams:
        read_events(f, 2)  # running: the role chunk and a first piece
    streams += [open_stream(server, long) for _ in range(16)]
    wait_for(lambda: server.get("/health")["waiting"] == 16)
    code, out, headers = server.post(long)
    assert code == 429 and "max_queue 16" in out["error"]["message"] and headers.get("retry-after") == "1"
    for sock, f in streams:
        f.close()
        sock.close()
    wait_for(lambda: (lambda h: h["active"] == 0 and h["waiting"] == 0)(server.get("/health")), 30)
    assert server.get("/health")["stats"]["cancelled"] - before == 20
    code, out, _ = server.post({"messages": openai_messages(*QUESTIONS[2]), "temperature": 0, "max_tokens": 4})
    assert code == 200 and out["choices"][0]["message"]["content"] == solo_text(tiny_chat, *QUESTIONS[2], 4)[0]


def cdp(ws_url):
    """A minimal Chrome DevTools Protocol client: call(method, **params) -> result."""
    import websocket

    # No Origin header: Chromium (111+) refuses DevTools connections from an origin it was not told to allow.
    ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
    counter = iter(range(1, 10**6))

    def call(method, **params):
        i = next(counter)
        ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
    return ws, call


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_chat_page_in_headless_chromium(server, tiny_chat, tmp_path):
    """The page at / in headless Chromium: choose an example image, type the question, press Ask; the streamed
    answer on the page is `generate`'s. A screenshot goes to $SERVE_SCREENSHOT when set."""
    text, image = QUESTIONS[6]
    want, _ = solo_text(tiny_chat, text, image, 256)
    port = free_port()
    chrome = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--remote-debugging-port={port}",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,700", "about:blank"],
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
        ws, call = cdp(targets()[0]["webSocketDebuggerUrl"])
        call("Page.enable")
        call("Page.navigate", url=server.url + "/")
        evaluate = lambda js: call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value")  # noqa: E731
        wait_for(lambda: evaluate("document.readyState") == "complete" and evaluate("!!document.getElementById('file')"))
        wait_for(lambda: evaluate("document.getElementById('model').textContent") == "tiny-shapes")
        root = call("DOM.getDocument")["root"]["nodeId"]
        node = call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        call("DOM.setFileInputFiles", nodeId=node, files=[os.path.join(EXAMPLES, image)])
        wait_for(lambda: evaluate("document.getElementById('preview').src.startsWith('data:image/png')"))
        evaluate(f"document.getElementById('question').value = {json.dumps(text)};"
                 "document.getElementById('send').click(); true")
        wait_for(lambda: evaluate("(document.querySelector('.assistant, .error') || {}).dataset?.state") in ("done", "error"))
        assert evaluate("document.querySelector('.turn.user').textContent").startswith(text)
        assert evaluate("document.querySelector('.assistant').textContent") == want
        shot = os.environ.get("SERVE_SCREENSHOT")
        if shot:
            with open(shot, "wb") as f:
                f.write(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
    finally:
        if ws is not None:
            ws.close()
        chrome.terminate()
        try:
            chrome.wait(20)
        except subprocess.TimeoutExpired:
            chrome.kill()
            chrome.wait()


def test_sigterm_drains_running_requests_and_exits(server, tiny_chat):
    """SIGTERM while 4 answers stream: each finishes in full, then the process exits 0; afterwards nothing
    listens. (Runs last: it stops the module's server.)"""
    q = QUESTIONS[3]
    want, _ = solo_text(tiny_chat, *q, 600, ignore_eos=True)
    body = {"model": "tiny-shapes", "messages": openai_messages(*q), "temperature": 0, "max_tokens": 600,
            "ignore_eos": True}
    streams = [open_stream(server, body) for _ in range(4)]
    results = [read_events(f, 2) for _, f in streams]  # all 4 running
    server.proc.send_signal(signal.SIGTERM)

    def drain(i):
        for e in read_events(streams[i][1], 10_000):
            results[i].append(e)
            if e == "[DONE]":
                break
    threads = [threading.Thread(target=drain, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert server.proc.wait(60) == 0
    for events in results:
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    server.log.seek(0)
    log = server.log.read()
    assert "Waiting for connections to close" in log  # the 4 answers were still running at SIGTERM
    assert "Traceback" not in log


MESH_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from idefics_jax.generation.chat import Chat, user_turn
from idefics_jax.checkpoints.load import load_pretrained
from idefics_jax.generation.api import generate
from idefics_jax.ops.quantize import QuantizedWeight
from idefics_jax.serve.engine import Engine, Request
from idefics_jax.model.sharding import make_mesh
from transformers import AutoProcessor

path = sys.argv[1]
model = load_pretrained(path, mesh=make_mesh((2, 2, 2)))
chat = Chat(model, AutoProcessor.from_pretrained(path))
texts = ["what is this", "why the dots", "show the red", "many kinds o", "blue or what"]
reqs = [Request(user_turn(t), None, max_tokens=m, ignore_eos=True) for t, m in zip(texts, (9, 3, 14, 6, 11))]
with Engine(model, chat, slots=4, max_len=64) as engine:
    got = [h.result().tokens for h in [engine.submit(r) for r in reqs]]
    spec = str(engine.decoder.state.cache.k.sharding.spec)
want = []
for r in reqs:
    inputs = chat.inputs(r.messages)
    want.append(generate(model, **inputs, max_new_tokens=r.max_tokens, eos_token_id=[])[0, -r.max_tokens:].tolist())
print(json.dumps({"got": got, "want": want, "spec": spec}))
"""


def test_engine_on_a_mesh(lively_hf):
    """On a (2, 2, 2) mesh of 8 simulated devices (a fresh process): the slot cache is sharded over the mesh
    (slots over data and fsdp, kv heads over tensor) and the answers are `generate`'s on that mesh."""
    env = programs.env(8)
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, lively_hf], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["got"] == r["want"]
    assert "data" in r["spec"] and "tensor" in r["spec"], r["spec"]
