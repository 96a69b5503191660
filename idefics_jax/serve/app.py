"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn), and the chat page.

    POST /v1/chat/completions   messages with text and image_url parts (data: URLs; local paths under
                                `allow_local_images`), stream (server-sent events), max_tokens, temperature
                                (0 = greedy), top_p, seed, stop, ignore_eos, add_generation_prompt,
                                continue_final_message (as vLLM), response_format (json_schema, json_object;
                                vLLM's structured_outputs / guided_*); usage counts
    GET  /v1/models, GET /health, GET /metrics (Prometheus), GET / (the chat page)

    app = create_app(Engine(model, processor, slots=8), "tiny-shapes")   # then uvicorn.run(app, ...)
    serve("tiny-shapes", port=8000)                                        # what `idefics-jax serve` runs

Bad requests get a 4xx with a one-line message ({"error": {"message": ..., "type": ...}}, as OpenAI sends them)
and never reach the engine; a full queue gets 429 with Retry-After. A client that disconnects cancels its
request, freeing the slot. On SIGTERM uvicorn stops accepting, lets running requests finish for up to
`drain_timeout` seconds, then the engine stops. With `api_key` every path but / and /health needs it
(`serve.guard`); bodies over `max_body` bytes get 413 before more is read. Bodies are parsed and images decoded
on a pool of threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import functools
import io
import json
import os
import secrets
import signal
import sys
import time
import warnings
from typing import Any, Callable

from fastapi import Request as HttpRequest  # at module level: FastAPI resolves the (string) annotation here

from idefics_jax.generation.images import to_rgb
from idefics_jax.generation.structured import from_request
from idefics_jax.serve.engine import Engine, EngineStopped, QueueFull, Request
from idefics_jax.serve.guard import ENV_KEY, Guard, exposed
from idefics_jax.serve.metrics import CountResponses, Metrics

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_BODY_MB = 64
STATIC = os.path.join(os.path.dirname(__file__), "static")


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


def decode_image(url: str, index: int, *, allow_local_images: str | None, max_pixels: int):
    """An image_url's url (a data: URL, or a local path under `allow_local_images`) -> an RGB PIL image."""
    import PIL.Image

    where = f"image {index}"
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise BadRequest(f"{where}: data URLs must be base64 (data:image/png;base64,...)")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}: the data URL is not valid base64") from None
        source: Any = io.BytesIO(raw)
    elif "://" in url and not url.startswith("file://"):
        raise BadRequest(f"{where}: this server does not fetch URLs; send the image as a data: URL")
    else:
        path = url[len("file://"):] if url.startswith("file://") else url
        if allow_local_images is None:
            raise BadRequest(f"{where}: local image paths are not allowed (start the server with "
                             "--allow-local-images DIR); send the image as a data: URL")
        root = os.path.realpath(allow_local_images)
        path = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, path]) != root:
            raise BadRequest(f"{where}: {url} is outside the allowed image directory")
        if not os.path.isfile(path):
            raise BadRequest(f"{where}: {url}: no such image file")
        source = path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            img = PIL.Image.open(source)
        except (PIL.Image.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError):
            raise BadRequest(f"{where}: not a decodable image") from None
        if img.width * img.height > max_pixels:
            raise BadRequest(f"{where}: {img.width} x {img.height} is over the limit of {max_pixels:,} pixels",
                             status=413)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError):
            raise BadRequest(f"{where}: truncated or corrupt {img.format or 'image'} data") from None
    try:
        return to_rgb(img, where)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def to_messages(messages, **image_kw) -> tuple[list[dict], list]:
    """OpenAI chat messages -> (messages in the chat-template format, their images in order)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}] must be an object with role system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            elif kind == "image_url":
                url = p.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise BadRequest(f"messages[{i}].content[{j}].image_url.url must be a string")
                images.append(decode_image(url, len(images) + 1, **image_kw))
                parts.append({"type": "image"})
            else:
                raise BadRequest(f"messages[{i}].content[{j}] must be a text or image_url part")
        out.append({"role": m["role"], "content": parts})
    return out, images


def _number(body: dict, name: str, default, kind=float):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise BadRequest(f"{name} must be {'a number' if kind is float else 'an integer'}; got {v!r}")
    return v


def template_options(body: dict) -> tuple[bool, bool]:
    """vLLM's add_generation_prompt (default true) and continue_final_message (default false): a final assistant
    message is closed and a new one opened, or continued (its text starts the answer), or neither."""
    add, cont = body.get("add_generation_prompt"), body.get("continue_final_message")
    for name, v in (("add_generation_prompt", add), ("continue_final_message", cont)):
        if v is not None and not isinstance(v, bool):
            raise BadRequest(f"{name} must be true or false; got {v!r}")
    if add and cont:
        raise BadRequest("cannot set both continue_final_message and add_generation_prompt to true")
    return (not cont) if add is None else add, bool(cont)


def parse_request(body, model_name: str, engine: Engine, *, max_images: int, **image_kw) -> tuple[Request, bool, bool]:
    """A chat-completions body -> (Request, stream, include_usage in the stream); BadRequest on any fault."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model", model_name)
    if model != model_name:
        raise BadRequest(f"model {model!r} not found; this server serves {model_name!r}", 404, "not_found_error")
    if body.get("n", 1) != 1:
        raise BadRequest("only n = 1 is supported")
    raw = body.get("messages")
    n_images = sum(1 for m in raw if isinstance(m, dict) and isinstance(m.get("content"), list)
                   for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url") \
        if isinstance(raw, list) else 0
    if n_images > max_images:  # before decoding any of them
        raise BadRequest(f"too many images: {n_images} (at most {max_images} per request)")
    messages, images = to_messages(raw, **image_kw)
    max_tokens = _number(body, "max_completion_tokens", None, int)
    max_tokens = _number(body, "max_tokens", max_tokens, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a string or a list of at most 4 non-empty strings")
    seed = _number(body, "seed", None, int)
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension
    if not isinstance(ignore_eos, bool):
        raise BadRequest(f"ignore_eos must be true or false; got {ignore_eos!r}")
    try:
        response_format = from_request(body)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    req = Request(messages, images, max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0),
                  top_p=_number(body, "top_p", 1.0), seed=secrets.randbits(31) if seed is None else seed, stop=stop,
                  ignore_eos=ignore_eos, response_format=response_format)
    req.add_generation_prompt, req.continue_final_message = template_options(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false; got {stream!r}")
    opts = body.get("stream_options") or {}
    return req, stream, bool(isinstance(opts, dict) and opts.get("include_usage"))


def parse_body(raw: bytes, model_name: str, engine: Engine, **kw) -> tuple[Request, bool, bool]:
    """A request body's bytes -> `parse_request`'s (Request, stream, include_usage); BadRequest on any fault."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON body ({e})") from None
    return parse_request(body, model_name, engine, **kw)


def create_app(engine: Engine, model_name: str, *, allow_local_images: str | None = None, max_images: int = 8,
               max_image_pixels: int = MAX_IMAGE_PIXELS, drain_timeout: float = 30.0, api_key: str | None = None,
               max_body: int = MAX_BODY_MB << 20, decode_threads: int | None = None):
    """The FastAPI app; it starts `engine` at startup and stops it (draining) at shutdown. `api_key`: needed by
    every path but / and /health (None: open); `max_body`: bytes per request body; `decode_threads`: the pool
    that parses bodies, decodes images and prepares prompts (default: up to 4)."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    pool = concurrent.futures.ThreadPoolExecutor(decode_threads or min(4, os.cpu_count() or 1),
                                                 thread_name_prefix="idefics-jax-requests")
    metrics = Metrics(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.stop, drain_timeout)
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="idefics-jax", lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    app.add_middleware(CountResponses, metrics=metrics, path="/v1/chat/completions")  # outermost: sees 401 / 413
    image_kw = dict(allow_local_images=allow_local_images, max_pixels=max_image_pixels)

    async def off_loop(fn, *args, **kw):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kw))

    def error(e: BadRequest) -> JSONResponse:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return JSONResponse({"error": {"message": msg, "type": e.kind, "code": e.status}}, e.status,
                            headers=e.headers)

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.load(), "stats": dict(engine.stats)}

    @app.get("/metrics")
    async def prometheus():
        text, content_type = metrics.render()
        return Response(text, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "idefics-jax"}]}

    @app.post("/v1/chat/completions")
    async def completions(http: HttpRequest):
        try:
            req, stream, include_usage = await off_loop(
                parse_body, await http.body(), model_name, engine, max_images=max_images, **image_kw)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def on_event(ev):  # on the engine's thread
                if ev[0] == "done":
                    metrics.observe(ev[1])
                elif ev[0] == "error":
                    metrics.failed()
                loop.call_soon_threadsafe(events.put_nowait, ev)

            try:
                handle = await off_loop(engine.submit, req, on_event=on_event)
            except QueueFull as e:
                raise BadRequest(f"server busy: {e}; retry later", 429, "rate_limit_error",
                                 {"Retry-After": "1"}) from None
            except EngineStopped as e:
                raise BadRequest(str(e), 503, "unavailable") from None
            except ValueError as e:  # the engine's checks: images vs entries, prompt and max_tokens vs positions
                raise BadRequest(str(e)) from None
        except BadRequest as e:
            return error(e)

        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        async def next_event():
            """The handle's next event; cancels the request if the client went away meanwhile."""
            while True:
                try:
                    return await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        handle.cancel()
                        raise asyncio.CancelledError from None

        def usage(r):
            return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                    "total_tokens": r.prompt_tokens + r.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}

        def chunk(delta: dict, finish=None, **extra) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(c)}\n\n"

        if not stream:
            try:
                while (ev := await next_event())[0] == "text":
                    pass
            finally:
                if not handle.done():
                    handle.cancel()
            if ev[0] == "error":
                return error(BadRequest(f"generation failed: {ev[1]}", 500, "server_error"))
            r = ev[1]
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                                 "finish_reason": r.finish_reason}], "usage": usage(r)}

        async def sse():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (ev := await next_event())[0] == "text":
                    yield chunk({"content": ev[1]})
                if ev[0] == "error":
                    yield f"data: {json.dumps({'error': {'message': str(ev[1]), 'type': 'server_error'}})}\n\n"
                    return
                yield chunk({}, ev[1].finish_reason)
                if include_usage:
                    last = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                            "choices": [], "usage": usage(ev[1])}
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the slot
                if not handle.done():
                    handle.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def serve(model: str = "tiny-shapes", *, host: str = "127.0.0.1", port: int = 8000, slots: int = 8,
          max_len: int | None = None, max_queue: int = 64, dtype=None, allow_local_images: str | None = None,
          max_images: int = 8, max_image_pixels: int = MAX_IMAGE_PIXELS, drain_timeout: float = 30.0,
          quantize: str | None = None, group_size: int | None = None, attention: str | None = None,
          load: Callable | None = None, api_key: str | None = None, max_body_mb: float = MAX_BODY_MB,
          prefix_cache_gb: float = 1.0, image_cache_gb: float = 0.25, mesh: str | None = None) -> None:
    """Loads `model` (any name `Chat.load` takes, or with `load` whatever it takes, e.g. the training layer's
    `load_chat` for a WORKDIR; `quantize` / `group_size` / `attention` / `mesh` as in `Chat.load`) and serves it
    until SIGTERM / Ctrl-C. `api_key` (default: the IDEFICS_JAX_API_KEY environment variable; none: open to all)."""
    import uvicorn

    from idefics_jax.generation.chat import Chat

    if allow_local_images is not None and not os.path.isdir(allow_local_images):
        raise ValueError(f"--allow-local-images {allow_local_images}: no such directory")
    api_key = api_key if api_key is not None else os.environ.get(ENV_KEY)
    if api_key is not None and not api_key.strip():
        raise ValueError(f"the API key is empty (--api-key or {ENV_KEY})")
    if not (isinstance(max_body_mb, (int, float)) and max_body_mb > 0):
        raise ValueError(f"--max-body-mb must be a positive number; got {max_body_mb!r}")
    if api_key is None and exposed(host):
        print(f"WARNING: serving on {host} without an API key: anyone who can reach port {port} can use the "
              f"model; set --api-key or {ENV_KEY}", file=sys.stderr, flush=True)
    chat = (load or Chat.load)(model, dtype=dtype, quantize=quantize, group_size=group_size, attention=attention,
                               mesh=mesh)
    engine = Engine(chat.model, chat, slots=slots, max_len=max_len, max_queue=max_queue,
                    prefix_cache_gb=prefix_cache_gb, image_cache_gb=image_cache_gb)
    name = os.path.basename(os.path.normpath(model))
    app = create_app(engine, name, allow_local_images=allow_local_images, max_images=max_images,
                     max_image_pixels=max_image_pixels, drain_timeout=drain_timeout, api_key=api_key,
                     max_body=int(max_body_mb * 2**20))
    # uvicorn drains on SIGTERM / SIGINT, then raises the signal again under the handler it found: with this one
    # the process exits 0 after a clean drain (while loading, above, the default handler ends it at once).
    signal.signal(signal.SIGTERM, _exit)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level="info")


def _exit(signum, frame):
    raise SystemExit(0)
