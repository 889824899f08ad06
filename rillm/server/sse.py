"""Server-Sent Events framing: one event per chunk, keep-alive comments, the final [DONE], and
a response that cancels its body when the client goes away."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from rillm.server.resume import ResumableStream

KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any], event: str | None = None) -> str:
    """One event; `event`: its `event:` line (the Responses and Messages APIs name each
    event by its type; OpenAI's chunks have none)."""
    line = f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
    return line if event is None else f"event: {event}\n{line}"


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that stops (and so aborts the request) as soon as the
    client goes away, even while nothing is being written."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str],
                 resumable: ResumableStream | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        self.on_close: Callable[[], None] | None = None
        """Called once the response is over, however it ended (even where the client left
        before the body began, so the body iterator never ran)."""
        self.resumable = resumable
        """The stream this response reads, where it outlives the response
        (rillm/server/resume.py)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            if self.on_close is not None:
                self.on_close()
