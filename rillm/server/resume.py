"""Resumable streams (`--stream-resume-window SECONDS`, off by default).

Off, a stream is its HTTP response: the client leaves, the request is aborted at once. On,
a stream outlives its connection for the window: its events are produced by a task of their
own into a buffer, each with an SSE `id:` (`{response id}/{sequence number}`), and an HTTP
response only reads that buffer. A client whose connection broke sends the same request again
with `Last-Event-ID: <the last id it got>` and reads the events after it, then the rest of
the stream, byte for byte what the first connection would have carried. A stream with no
reader for a whole window is ended: its request aborted (its KV blocks freed), or, once
finished, its buffer dropped.

Bounded by what it keeps: a stream's own events (its tokens, at most max_model_len of them),
for at most a window after its last reader left; the streams themselves by the queue bound,
since a detached stream keeps its place until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from rillm.server.errors import APIError
from rillm.server.sse import KEEPALIVE

logger = logging.getLogger(__name__)


class ResumableStream:
    def __init__(self, stream_id: str, body: AsyncIterator[str], registry: StreamRegistry) -> None:
        self.stream_id = stream_id
        self.events: list[str] = []
        """Every data event so far, framed with its `id:` line."""
        self.done = False
        self._on_end: list[Callable[[], None]] = []
        self._registry = registry
        self._changed = asyncio.Event()
        self._readers = 0
        self._expiry: asyncio.TimerHandle | None = None
        self._task = asyncio.create_task(self._produce(body))

    async def _produce(self, body: AsyncIterator[str]) -> None:
        try:
            async for text in body:
                if text == KEEPALIVE:
                    continue  # readers make their own while they wait
                self.events.append(f"id: {self.stream_id}/{len(self.events)}\n{text}")
                self._notify()
        except Exception:  # noqa: BLE001 - the body reports its own errors as events
            logger.exception("a resumable stream's producer failed")
        finally:
            with contextlib.suppress(Exception):
                await body.aclose()  # type: ignore[attr-defined]
            self.done = True
            self._notify()
            for callback in self._on_end:
                callback()

    def when_ended(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the producer has ended (finished, or aborted at the window's
        end); at once if it has."""
        if self.done:
            callback()
        else:
            self._on_end.append(callback)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def read(self, after: int, keepalive: float) -> AsyncIterator[str]:
        """The events after sequence number `after`, then each new one until the stream ends;
        a keep-alive comment after `keepalive` seconds without one."""
        self._attach()
        try:
            sent = after + 1
            while True:
                while sent < len(self.events):
                    yield self.events[sent]
                    sent += 1
                if self.done:
                    return
                try:
                    await asyncio.wait_for(self._changed.wait(), keepalive)
                except TimeoutError:
                    yield KEEPALIVE
        finally:
            self._detach()

    def _attach(self) -> None:
        self._readers += 1
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _detach(self) -> None:
        self._readers -= 1
        if self._readers == 0:
            self._expiry = asyncio.get_running_loop().call_later(
                self._registry.window, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        if self._readers:
            return
        self._registry.forget(self.stream_id)
        if not self.done:
            logger.info("stream %s had no reader for %g s; aborted", self.stream_id,
                        self._registry.window)
            self._task.cancel()  # the body's finally aborts its engine requests

    def cancel(self) -> None:
        self._task.cancel()


class StreamRegistry:
    """The server's resumable streams, by response id."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._streams: dict[str, ResumableStream] = {}

    def start(self, stream_id: str, body: AsyncIterator[str]) -> ResumableStream:
        stream = ResumableStream(stream_id, body, self)
        self._streams[stream_id] = stream
        return stream

    def forget(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)

    def resume(self, last_event_id: str) -> tuple[ResumableStream, int]:
        """The stream a `Last-Event-ID` names and the sequence number to read after; a 404
        when it is unknown or its window has passed."""
        stream_id, _, seq = last_event_id.strip().rpartition("/")
        stream = self._streams.get(stream_id)
        if stream is None or not seq.lstrip("-").isdigit():
            raise APIError(404, f"no stream {last_event_id!r} to resume: unknown, or its "
                           f"resume window ({self.window:g} s) has passed",
                           param="Last-Event-ID", code="stream_not_found")
        after = int(seq)
        if not -1 <= after < len(stream.events):
            raise APIError(400, f"stream {stream_id} has no event {after}",
                           param="Last-Event-ID")
        return stream, after

    def close(self) -> None:
        for stream in list(self._streams.values()):
            stream.cancel()
        self._streams.clear()
