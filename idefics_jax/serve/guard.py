"""What an exposed server checks before a route runs (ASGI middleware): the API key and the request body's size.

    app.add_middleware(Guard, api_key="...", max_body=64 << 20)

With a key, every path but the open ones (the chat page and /health) needs `Authorization: Bearer KEY`; anything
else gets 401. A body longer than `max_body` bytes gets 413: at once when its Content-Length says so (nothing of
it is read), else as soon as the bytes read pass the cap (a chunked upload), so at most `max_body` bytes of a body
are ever held. Errors are one-line OpenAI-style JSON, as the server's others.
"""

from __future__ import annotations

import ipaddress
import json
import secrets

OPEN_PATHS = ("/", "/health")
ENV_KEY = "IDEFICS_JAX_API_KEY"


class _BodyTooLarge(Exception):
    pass


async def reply(send, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
    """A whole JSON error response: {"error": {"message", "type", "code"}}."""
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: `api_key` (None: none needed) for every path outside `open_paths`; bodies of at most
    `max_body` bytes."""

    def __init__(self, app, *, api_key: str | None, max_body: int, open_paths=OPEN_PATHS):
        self.app, self.max_body, self.open_paths = app, max_body, open_paths
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] not in self.open_paths and \
                not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await reply(send, 401, "a valid API key is needed: send the header Authorization: Bearer KEY",
                               "authentication_error", {"WWW-Authenticate": "Bearer"})
        limit = f"the request body is over the limit of {self.max_body / 2**20:g} MB (--max-body-mb)"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            if not length.isdigit():
                return await reply(send, 400, "Content-Length must be a number of bytes", "invalid_request_error")
            return await reply(send, 413, limit, "invalid_request_error", {"Connection": "close"})

        read, started = 0, False

        async def capped_receive():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_body:
                    raise _BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except _BodyTooLarge:
            if not started:
                await reply(send, 413, limit, "invalid_request_error", {"Connection": "close"})


def exposed(host: str) -> bool:
    """Whether listening on `host` reaches beyond this machine (anything but a loopback address or localhost)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: whatever it resolves to, assume others can reach it
        return True
