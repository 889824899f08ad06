"""What every HTTP request passes before the app reads a byte of its body: the API key (on the
routes it guards) and the body-size bound.

A pure ASGI middleware, because FastAPI reads and parses a route's body before its
dependencies run: checked there, anyone without a key could make the server parse a
multi-gigabyte body. Here the key is checked from the headers alone, a declared
Content-Length over the bound is refused at once, and a body sent in chunks (no length) is
counted as it arrives and cut off at the bound.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from rillm.server.errors import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

def guarded(path: str) -> bool:
    """The routes an API key protects: the OpenAI API and (de)tokenize. /health, /metrics,
    /version and the chat page stay open."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


def key_matches(header: str, expected: bytes) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time as bytes (a header is latin-1
    text, any byte; compare_digest refuses a str once it is not ASCII)."""
    scheme, _, token = header.partition(" ")
    sent = token.strip().encode("latin-1", "replace")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, expected)


class RequestGate:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode("utf-8") if api_key is not None else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        if (self.api_key is not None and scope.get("method") != "OPTIONS"
                and guarded(scope.get("path", ""))
                and not key_matches(headers.get(b"authorization", b"").decode("latin-1"),
                                    self.api_key)):
            await _refuse(scope, receive, send, APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                code="invalid_api_key"))
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit()
                                     or int(declared) > self.max_body_bytes):
            await _refuse(scope, receive, send, self._too_large())
            return
        await self._counted(scope, receive, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes "
                        "(the server's --max-request-body-bytes)", code="body_too_large")

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the body through, counting it; past the bound the app is told the client left
        and the client gets the 413 (unless the app had already begun its response)."""
        received = 0
        over = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the 413 below answers instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise  # the app's own failure: the server's 500 handler answers it
        if over and not started:
            response = JSONResponse(self._too_large().body(), status_code=413)
            await response(scope, counted_receive, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
    await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
