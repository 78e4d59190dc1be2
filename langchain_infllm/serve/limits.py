"""Bearer-token auth, a request-size limit and a limit on concurrent sessions.

Each refusal is an `APIError` in OpenAI's shape (401, 413, 429), raised before the
engine is touched.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from langchain_infllm.serve.errors import bad_request, error_body, too_large, too_many, unauthorized

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SESSION_HEADER = "x-session-id"
MAX_SESSION_ID = 256
_SESSION_RE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """Raise 401 unless auth is off or the header is ``Bearer <api_key>`` (compared in
    constant time, so the key cannot be guessed byte by byte from response times)."""
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise unauthorized()


def session_id_of(header: str | None, user: str | None) -> str | None:
    """The session a request names: the ``X-Session-Id`` header, else the ``user`` field,
    else None (the chat core then picks the best prefix match)."""
    value = header if header is not None else user
    if value is None:
        return None
    if len(value) > MAX_SESSION_ID or not _SESSION_RE.match(value):
        raise bad_request(
            f"session id must be 1-{MAX_SESSION_ID} printable ASCII characters",
            param="X-Session-Id" if header is not None else "user",
        )
    return value


class SessionSlots:
    """At most `limit` sessions generate at once; one more is refused with 429.

    Requests without a session id each count as their own session. Not thread-safe by
    design: it lives on the event loop.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._busy: dict[object, int] = {}

    @property
    def in_use(self) -> int:
        return len(self._busy)

    def acquire(self, session_id: str | None) -> object:
        """Take a slot for `session_id` (429 when all are busy); give back the returned
        key to `release`."""
        key: object = session_id if session_id is not None else object()
        if self.limit is not None and key not in self._busy and len(self._busy) >= self.limit:
            raise too_many(f"{self.limit} sessions are generating already; retry shortly")
        self._busy[key] = self._busy.get(key, 0) + 1
        return key

    def release(self, key: object) -> None:
        left = self._busy.get(key, 0) - 1
        if left > 0:
            self._busy[key] = left
        else:
            self._busy.pop(key, None)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, by the
    Content-Length header when there is one and by counting the bytes otherwise."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _reply(send, 400, error_body("invalid Content-Length header"))
                    return
                if length > self.max_bytes:
                    await _reply(
                        send,
                        413,
                        error_body(too_large(self.max_bytes).message, code="request_too_large"),
                    )
                    return
        seen = 0
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, guarded_send)
        except _TooLarge:
            if not started:
                await _reply(
                    send,
                    413,
                    error_body(too_large(self.max_bytes).message, code="request_too_large"),
                )


class _TooLarge(Exception):
    pass


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    import json

    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
