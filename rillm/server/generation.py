"""One generation request on the server side: its engine requests (one per prompt), their
merged deltas with keep-alive ticks, usage counting, and the request's life-cycle
bookkeeping (active count, abort on disconnect)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request

from rillm.engine.protocol import ServingEngine
from rillm.outputs import CompletionOutput, Logprob, RequestOutput, merge_all
from rillm.sampling_params import InvalidParameterError, SamplingParams
from rillm.server.errors import APIError
from rillm.server.protocol import error_body
from rillm.server.sse import EventStreamResponse, sse
from rillm.server.streaming import ChoiceBuffer, engine_events

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPiece:
    """One choice's text (and logprobs) ready to send."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Logprob]
    first: bool
    """The choice's first piece."""
    finish_reason: str | None
    stop_reason: str | int | None
    completion_tokens: int
    """Tokens generated so far over all choices."""


class Generation:
    def __init__(self, state: Any, engine: ServingEngine, response_id: str, model: str,
                 prompts: Sequence[Sequence[int]], params: SamplingParams,
                 max_tokens: Sequence[int], client_request_id: str | None = None) -> None:
        """`prompts`, each admitted with its resolved `max_tokens` (`admit`);
        `client_request_id`: the request's X-Request-Id, for the request log."""
        self.client_request_id = client_request_id
        self.state = state
        self.engine = engine
        self.response_id = response_id
        self.model = model
        self.created = int(time.time())
        self.prompts = [list(p) for p in prompts]
        self.max_tokens = list(max_tokens)
        self.params = params
        self.num_prompt_tokens = sum(len(p) for p in self.prompts)
        self._cached = [0] * len(self.prompts)
        self._request_ids = [
            response_id if len(self.prompts) == 1 else f"{response_id}-{i}"
            for i in range(len(self.prompts))
        ]

    def stream_response(self, body: AsyncIterator[str]) -> EventStreamResponse:
        streams = self.state.streams
        if streams is None:
            return EventStreamResponse(body)
        stream = streams.start(self.response_id, body)
        return EventStreamResponse(stream.read(-1, self.state.config.keepalive_interval), stream)

    async def events(self) -> AsyncIterator[RequestOutput | None]:
        """Deltas of every prompt, choice indices numbered prompt-major (prompt i, choice j ->
        i * n + j); None after each keep-alive interval without one."""
        keepalive = self.state.config.keepalive_interval
        if len(self.prompts) == 1:
            async for output in self._observed(0, keepalive):
                yield output
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, queue)) for i in range(len(self.prompts))]
        remaining = len(tasks)
        try:
            while remaining:
                try:
                    index, item = await asyncio.wait_for(queue.get(), keepalive)
                except TimeoutError:
                    yield None
                    continue
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    remaining -= 1
                    continue
                yield _renumber(item, index * self.params.n)
        finally:
            for task in tasks:
                task.cancel()
            for request_id in self._request_ids:
                self.engine.abort(request_id)

    async def _pump(self, index: int, queue: asyncio.Queue) -> None:
        try:
            async for output in self._observed(index, 3600.0):
                if output is not None:
                    queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache (known once each prompt's first output
        arrived)."""
        return sum(self._cached)

    async def _observed(self, index: int, keepalive: float
                        ) -> AsyncIterator[RequestOutput | None]:
        """One engine request's deltas; once it has ended (or been left), its counts and
        timings go to /metrics."""
        last: RequestOutput | None = None
        generated = 0
        try:
            async for output in engine_events(self.engine, self.prompts[index], self.params,
                                              self.max_tokens[index],
                                              self._request_ids[index], keepalive):
                if output is not None:
                    last = output
                    generated += sum(len(c.token_ids) for c in output.outputs)
                    self._cached[index] = max(output.num_cached_tokens, 0)
                yield output
        finally:
            recorder = self.state.recorder
            if recorder is not None and last is not None:
                recorder.finished(last, generated)
            if self.state.config.enable_log_requests:
                self._log(index, last, generated)

    def _log(self, index: int, last: RequestOutput | None, generated: int) -> None:
        """--enable-log-requests: one line per engine request once it has ended."""
        reasons = ",".join(c.finish_reason or "abort" for c in last.outputs) \
            if last is not None and last.finished else "abort"
        timing = last.metrics if last is not None else None
        times = (f", first token {timing.first_token:.3f} s, end {timing.finished:.3f} s"
                 if timing is not None else "")
        client = f" (X-Request-Id {self.client_request_id})" if self.client_request_id else ""
        params = self.params
        logger.info("request %s%s: %d prompt tokens (%d cached), %d generated, finish %s%s; "
                    "n=%d temperature=%g top_p=%g max_tokens=%d", self._request_ids[index],
                    client, len(self.prompts[index]), self._cached[index], generated, reasons,
                    times, params.n, params.temperature, params.top_p, self.max_tokens[index])

    async def collect(self) -> RequestOutput:
        """Every delta merged into one whole output."""
        deltas = [output async for output in self.events() if output is not None]
        assert deltas
        return merge_all(deltas)  # joined once: pairwise is quadratic in the length

    async def pieces(self, interval: int) -> AsyncIterator[StreamPiece | None]:
        """What a stream sends: each choice's text batched by `interval` tokens (the first and
        the last piece never wait); None for a keep-alive tick."""
        buffers = [ChoiceBuffer() for _ in range(self.params.n * len(self.prompts))]
        completion_tokens = 0
        async for output in self.events():
            if output is None:
                yield None
                continue
            for delta in output.outputs:
                completion_tokens += len(delta.token_ids)
                buffer = buffers[delta.index]
                first = buffer.num_sent_events == 0
                buffer.add(delta)
                if buffer.ready(interval):
                    text, token_ids, logprobs = buffer.take()
                    yield StreamPiece(delta.index, text, token_ids, logprobs, first,
                                      buffer.finish_reason, buffer.stop_reason,
                                      completion_tokens)

    def event(self, obj: str, choices: list[dict[str, Any]],
              completion_tokens: int | None = None, usage: dict[str, Any] | None = None
              ) -> str:
        """One SSE chunk of this response; with usage when `completion_tokens` (or the
        whole `usage`) is given."""
        data: dict[str, Any] = {"id": self.response_id, "object": obj, "created": self.created,
                                "model": self.model, "choices": choices}
        if usage is None and completion_tokens is not None:
            usage = self.usage_counts(completion_tokens)
        if usage is not None:
            data["usage"] = usage
        return sse(data)

    def usage_counts(self, completion_tokens: int,
                     reasoning_tokens: int | None = None) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.num_prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": self.num_prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}
        if reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        return usage

    def usage(self, final: RequestOutput, reasoning_tokens: int | None = None
              ) -> dict[str, Any]:
        return self.usage_counts(sum(len(c.token_ids) for c in final.outputs),
                                 reasoning_tokens)


def _renumber(output: RequestOutput, offset: int) -> RequestOutput:
    if offset == 0:
        return output
    outputs = tuple(
        CompletionOutput(c.index + offset, c.text, c.token_ids, c.logprobs, c.finish_reason,
                         c.stop_reason)
        for c in output.outputs
    )
    return RequestOutput(output.request_id, output.prompt_token_ids, outputs, output.finished,
                         output.prompt, output.num_cached_tokens)


async def admit(engine: ServingEngine, prompts: Sequence[Sequence[int]], params: SamplingParams,
                names: Mapping[str, str] | None = None) -> list[int]:
    """The engine's admission checks of every prompt, once, before any byte of the response:
    each prompt's resolved max_tokens, or a 400 naming the request's parameter (`names`
    renames the engine's: chat's `messages` for the prompt)."""
    try:
        return [await engine.validate(ids, params) for ids in prompts]
    except InvalidParameterError as exc:
        raise APIError.from_invalid(exc, names) from None


def error_event(exc: BaseException) -> str:
    """An error after the stream began: one `data:` event in the OpenAI error shape."""
    if isinstance(exc, APIError):
        return sse(exc.body())
    return sse(error_body(f"generation failed: {exc}", "server_error", None, None))


async def run_until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "the client closed the connection")
    finally:
        if not task.done():
            task.cancel()
