"""What every HTTP request passes before the app reads a byte of its body: the size of its
headers, the Host header, the API key (on the routes it guards) and the body-size bound.

A pure ASGI middleware, because FastAPI reads and parses a route's body before its
dependencies run: checked there, anyone without a key could make the server parse a
multi-gigabyte body. Here the key is checked from the headers alone, a declared
Content-Length over the bound is refused at once, and a body sent in chunks (no length) is
counted as it arrives and cut off at the bound.

The Host check is the defence against DNS rebinding: a web page whose name an attacker
re-points at 127.0.0.1 reaches a loopback server from the visitor's browser, with its own
name in the Host header. A server on a loopback address answers only the loopback names
(and what `--allowed-hosts` adds).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from rillm.memory import trim
from rillm.server.connections import MAX_HEADER_BYTES
from rillm.server.errors import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def allowed_hosts(host: str, extra: tuple[str, ...] = ()) -> frozenset[str] | None:
    """The Host names a server bound to `host` answers; None: any (a server bound to every
    interface, or to one address that other machines reach it by)."""
    if host in LOOPBACK_NAMES or host.startswith("127."):
        return LOOPBACK_NAMES | {host} | {name.lower() for name in extra}
    return None


def host_name(header: str) -> str:
    """`name:port`, `[v6]:port` or `name` -> the name (lower case, no brackets)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def guarded(path: str) -> bool:
    """The routes an API key protects: the OpenAI API, (de)tokenize, the metrics and the API
    schema. /health, /version and the chat page stay open."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/metrics",
                                               "/openapi.json")


def key_matches(headers: dict[bytes, bytes], keys: tuple[bytes, ...]) -> bool:
    """`Authorization: Bearer KEY` (OpenAI's clients) or `x-api-key: KEY` (Anthropic's) is
    one of `keys`, each compared in constant time as bytes (a header is latin-1 text, any
    byte); every key is compared, so the time says nothing of which one nearly matched."""
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    sent = [headers.get(b"x-api-key", b"").strip()]
    if scheme.lower() == b"bearer":
        sent.append(token.strip())
    matches = [hmac.compare_digest(candidate, key) for key in keys for candidate in sent]
    return any(matches)


REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
"""An X-Request-Id the server takes (echoed on the response, written in the request log)."""


def _echoing(send: Send, request_id: bytes) -> Send:
    """`send` with the request's X-Request-Id on its response."""

    async def echo(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []),
                                              (b"x-request-id", request_id)]}
        await send(message)

    return echo


class RequestGate:
    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], max_body_bytes: int,
                 hosts: frozenset[str] | None = None,
                 refuse: Callable[[str, str, bool], APIError | None] | None = None) -> None:
        """`refuse(method, path, resuming)`: the app's answer to a request it can judge by its
        head alone (a full queue), given before the body is read; None: let it through."""
        self.app = app
        self.refuse = refuse
        self.hosts = hosts
        self.api_keys = tuple(key.encode("utf-8") for key in api_keys)
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope.get("headers", [])
        if len(scope.get("raw_path") or b"") + len(scope.get("query_string", b"")) \
                + sum(len(name) + len(value) + 4 for name, value in raw) > MAX_HEADER_BYTES:
            error = APIError(431, f"the request line and headers are larger than "
                             f"{MAX_HEADER_BYTES} bytes", code="headers_too_large",
                             headers={"Connection": "close"})
            await error.response(scope.get("path", ""))(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in raw}
        host = headers.get(b"host")
        if self.hosts is not None and host is not None \
                and host_name(host.decode("latin-1")) not in self.hosts:
            error = APIError(400, "this server does not answer to that Host name (it listens on "
                             "a loopback address; --allowed-hosts adds names)",
                             code="host_not_allowed")
            await error.response(scope.get("path", ""))(scope, receive, send)
            return
        request_id = headers.get(b"x-request-id")
        if request_id is not None:
            if not REQUEST_ID.fullmatch(request_id):
                error = APIError(400, "X-Request-Id must be 1 to 128 letters, digits, '.', "
                                 "'_', ':' or '-'", code="invalid_request_id")
                await error.response(scope.get("path", ""))(scope, receive, send)
                return
            send = _echoing(send, request_id)
        if (self.api_keys and scope.get("method") != "OPTIONS"
                and guarded(scope.get("path", ""))
                and not key_matches(headers, self.api_keys)):
            error = APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' "
                             "or 'x-api-key: KEY')", code="invalid_api_key")
            await error.response(scope.get("path", ""))(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit()
                                     or int(declared) > self.max_body_bytes):
            await self._too_large().response(scope.get("path", ""))(scope, receive, send)
            return
        if self.refuse is not None and (refused := self.refuse(
                scope.get("method", ""), scope.get("path", ""), b"last-event-id" in headers)):
            await refused.response(scope.get("path", ""))(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self._counted(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                trim()  # the last request's memory, back to the system while idle

    def _too_large(self) -> APIError:
        # Connection: close, as the unread rest of the body cannot start a next request.
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes "
                        "(the server's --max-request-body-bytes)", code="body_too_large",
                        headers={"Connection": "close"})

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
            await self._too_large().response(scope.get("path", ""))(scope, counted_receive, send)
