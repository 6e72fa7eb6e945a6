"""Bounded request bodies: a body over the limit is refused with 413, and never held in memory whole.

A declared ``Content-Length`` over the limit is refused before anything is read. A body without one (chunked) is
read up to the limit and refused as soon as it passes it, so at most the limit plus one received chunk is ever
held; a body within the limit is handed on to the application as it was received.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024


class BodyLimitMiddleware:
    """Pure ASGI middleware (it must see the body as it arrives, which ``BaseHTTPMiddleware`` does not allow)."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._too_large(send)
            return
        if length is not None or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)  # the server stops reading at the declared length
            return
        received: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(send)
                return
            received.append(message)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(received, receive), send)

    async def _too_large(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that first hands out ``messages``, then defers to the server's own."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
