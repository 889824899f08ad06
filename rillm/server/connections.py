"""The connection's bounds, below the ASGI app: how many connections, how long a client may
take to send its request, and how long it may leave the server's writes unread.

uvicorn's h11 protocol bounds none of these: a connection that sends half a header line and
then nothing holds its socket for ever (slowloris), as does a body sent a byte a minute, and
a stream whose client stops reading blocks its generator in `send` for ever — still holding
its engine request and its place in the queue. `GuardedProtocol` is uvicorn's protocol with
timers for those three (nginx's client_header_timeout, client_body_timeout and
send_timeout), a cap on open connections (answered, past it, with a 503 and `Retry-After`),
errors in OpenAI's shape, and a lingering close (nginx's lingering_close): an answer that ends
a connection while the client is still sending (a 413 body, an oversized header) must not be
lost to the RST the kernel sends when a socket with unread input is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from rillm.server.errors import APIError, error_type
from rillm.server.protocol import error_body

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 32 * 1024
"""A request line and headers larger than this are refused (431 / 400); nginx's default is
4 x 8 KiB, Node's 16 KiB."""


LINGER_SECONDS = 5.0
"""How long a connection closed while its client may still be sending stays half-open, reading
and discarding, so the answer reaches the client before the socket closes (nginx's
lingering_time is 30 s); the client's own close ends it sooner."""


TOO_MANY_CONNECTIONS = APIError(503, "the server has too many open connections; retry shortly",
                                code="too_many_connections",
                                headers={"Retry-After": "1", "Connection": "close"})


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 512
    """Open connections at most; the next one's request is a 503 with Retry-After."""
    header_timeout: float = 10.0
    """Seconds a client has to send its request line and headers, and the longest pause
    allowed within its body."""
    send_timeout: float = 30.0
    """Seconds the server's writes may wait on a client that reads nothing; then the
    connection is dropped (a stream's request aborted, its blocks freed)."""

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.header_timeout <= 0 or self.send_timeout <= 0:
            raise ValueError("header_timeout and send_timeout must be positive")


def error_bytes(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response carrying OpenAI's error object, ending the connection (for
    the protocol's own answers, written to the transport where no ASGI cycle runs)."""
    body = json.dumps(error_body(message, error_type(status), None, code)).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's `http=` protocol class for these limits."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


class LingeringTransport(asyncio.Transport):
    """The transport uvicorn's code is handed: `close()` while the client may still be sending
    half-closes instead — the answer is flushed and followed by a FIN, the client's further
    bytes are read and dropped — and closes at the client's EOF or after LINGER_SECONDS.

    A plain close with unread input makes the kernel reset the connection at once, dropping
    the answer still in its send queue: the client sees ECONNRESET instead of its 413."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedProtocol) -> None:
        super().__init__()
        self._transport = transport
        self._protocol = protocol
        self.lingering = False
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        if not (self._protocol.client_may_send_more() and self._transport.can_write_eof()):
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()
        self._transport.resume_reading()
        self._timer = self._protocol.loop.call_later(LINGER_SECONDS, self._transport.close)

    def connection_lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.lingering:
            self._transport.write(data)

    def abort(self) -> None:
        self._transport.abort()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        if not self.lingering:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._transport.write_eof()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)


class GuardedProtocol(H11Protocol):
    limits: ConnectionLimits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._lingering = LingeringTransport(transport, self)
        super().connection_made(self._lingering)
        self._read_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._received_any = False
        if len(self.connections) > self.limits.max_connections:
            self.app = TOO_MANY_CONNECTIONS.response()  # what its requests are answered
        self._arm_read(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lingering.connection_lost()
        self._cancel_read()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering.lingering:
            return  # what a client still sends after its answer is dropped
        self._received_any = True
        super().data_received(data)
        if self.transport.is_closing():
            self._cancel_read()
        elif self.conn.their_state is h11.IDLE:
            # Waiting for (the rest of) a request's headers: the whole header within one
            # timeout, however it is dribbled.
            if self._read_timer is None:
                self._arm_read(self.limits.header_timeout)
        elif self.conn.their_state is h11.SEND_BODY:
            self._arm_read(self.limits.header_timeout)  # each pause in the body, afresh
        else:
            self._cancel_read()  # the request is in; the app has it

    def client_may_send_more(self) -> bool:
        """Whether the client may still be sending: its request's body is unread, its request
        broke h11, or it has begun another."""
        state = self.conn.their_state
        if state is h11.IDLE:
            return self._received_any
        return state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    def on_response_complete(self) -> None:
        self._cancel_read()
        self._received_any = False
        super().on_response_complete()  # uvicorn's keep-alive timer covers the idle wait

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.send_timeout, self._send_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP, or headers past h11's bound while still incomplete."""
        self.transport.write(error_bytes(400, "Bad Request", f"invalid HTTP request: {msg}",
                                         "invalid_http"))
        self.transport.close()

    def _arm_read(self, seconds: float) -> None:
        self._cancel_read()
        self._read_timer = self.loop.call_later(seconds, self._read_expired)

    def _cancel_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_expired(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY and self.flow.read_paused:
            # The app is behind in reading the body, not the client in sending it.
            self._arm_read(self.limits.header_timeout)
            return
        if state is h11.IDLE and self._received_any:
            self.transport.write(error_bytes(
                408, "Request Timeout", f"the request's headers did not arrive within "
                f"{self.limits.header_timeout:g} s (the server's --header-timeout)",
                "request_timeout"))
        elif state is h11.SEND_BODY:
            logger.warning("a client paused its request body for over %g s; connection closed",
                           self.limits.header_timeout)
        elif state is not h11.IDLE:
            return
        self.transport.close()

    def _send_expired(self) -> None:
        self._send_timer = None
        if not self.transport.is_closing():
            logger.warning("a client read nothing for %g s; connection dropped (its request "
                           "aborted)", self.limits.send_timeout)
            self.transport.abort()

