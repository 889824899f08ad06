"""Typed events from a streamed chat completion, and a stream collected into one result.

Works with any OpenAI-compatible server through the official `openai` SDK: the SDK parses
the SSE (skipping keep-alive comments) and raises `openai.APIError` for an in-band error
event; this module turns its chunks into events a program can `match` on.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ContentDelta:
    index: int
    text: str
    at: float
    """Seconds since the request was sent."""


@dataclass(frozen=True)
class ReasoningDelta:
    index: int
    text: str
    at: float


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    call_index: int
    id: str | None
    name: str | None
    arguments: str
    at: float


@dataclass(frozen=True)
class Finish:
    index: int
    reason: str
    at: float


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    at: float


ChatEvent = ContentDelta | ReasoningDelta | ToolCallDelta | Finish | Usage


@dataclass
class ToolCall:
    id: str | None = None
    name: str = ""
    arguments: str = ""


@dataclass
class ChatResult:
    """One choice's stream, collected. Latencies in seconds."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    time_to_first_token: float | None = None
    """Until the first content, reasoning or tool-call text."""
    inter_token_latencies: list[float] = field(default_factory=list)
    """Gaps between consecutive text-carrying events."""
    duration: float = 0.0

    @property
    def tokens_per_second(self) -> float | None:
        """Completion tokens per second after the first token (needs usage)."""
        if self.usage is None or self.time_to_first_token is None:
            return None
        generating = self.duration - self.time_to_first_token
        if generating <= 0 or self.usage.completion_tokens < 2:
            return None
        return (self.usage.completion_tokens - 1) / generating


def chunk_events(chunk: Any, at: float) -> Iterator[ChatEvent]:
    """The events in one SDK chunk (a ChatCompletionChunk)."""
    usage = getattr(chunk, "usage", None)
    for choice in chunk.choices or ():
        delta = choice.delta
        reasoning = getattr(delta, "reasoning", None) or getattr(delta, "reasoning_content", None)
        if reasoning:
            yield ReasoningDelta(choice.index, reasoning, at)
        if delta.content:
            yield ContentDelta(choice.index, delta.content, at)
        for call in delta.tool_calls or ():
            function = call.function
            yield ToolCallDelta(choice.index, call.index, call.id,
                                function.name if function else None,
                                (function.arguments or "") if function else "", at)
        if choice.finish_reason is not None:
            yield Finish(choice.index, choice.finish_reason, at)
    if usage is not None:
        yield Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, at)


def _request(kwargs: dict[str, Any]) -> dict[str, Any]:
    request = {**kwargs, "stream": True}
    request.setdefault("stream_options", {"include_usage": True})
    return request


def stream_chat(client: Any, **kwargs: Any) -> Generator[ChatEvent, None, None]:
    """Stream `client.chat.completions.create(**kwargs)` as events. Closing the iterator
    (or Ctrl-C while iterating) closes the connection, so the server aborts the request."""
    start = time.perf_counter()
    stream = client.chat.completions.create(**_request(kwargs))
    try:
        for chunk in stream:
            yield from chunk_events(chunk, time.perf_counter() - start)
    finally:
        stream.close()


async def astream_chat(client: Any, **kwargs: Any) -> AsyncIterator[ChatEvent]:
    """The asyncio twin of stream_chat, for `openai.AsyncOpenAI`."""
    start = time.perf_counter()
    stream = await client.chat.completions.create(**_request(kwargs))
    try:
        async for chunk in stream:
            for event in chunk_events(chunk, time.perf_counter() - start):
                yield event
    finally:
        await stream.close()


class Collector:
    """Folds events into ChatResults, one per choice index."""

    def __init__(self) -> None:
        self.results: dict[int, ChatResult] = {}
        self._last_text_at: dict[int, float] = {}
        self._usage: Usage | None = None
        self._end = 0.0

    def add(self, event: ChatEvent) -> None:
        self._end = max(self._end, event.at)
        if isinstance(event, Usage):
            self._usage = event
            return
        result = self.results.setdefault(event.index, ChatResult())
        if isinstance(event, Finish):
            result.finish_reason = event.reason
            return
        if isinstance(event, ContentDelta):
            result.text += event.text
        elif isinstance(event, ReasoningDelta):
            result.reasoning += event.text
        else:
            while len(result.tool_calls) <= event.call_index:
                result.tool_calls.append(ToolCall())
            call = result.tool_calls[event.call_index]
            call.id = call.id or event.id
            call.name += event.name or ""
            call.arguments += event.arguments
        last = self._last_text_at.get(event.index)
        if last is None:
            result.time_to_first_token = event.at
        else:
            result.inter_token_latencies.append(event.at - last)
        self._last_text_at[event.index] = event.at

    def finish(self) -> dict[int, ChatResult]:
        for result in self.results.values():
            result.usage = self._usage
            result.duration = self._end
        if not self.results:
            self.results[0] = ChatResult(usage=self._usage, duration=self._end)
        return self.results


def collect(events: Iterable[ChatEvent]) -> ChatResult:
    """The first choice of a stream, collected (use Collector for n > 1)."""
    collector = Collector()
    for event in events:
        collector.add(event)
    results = collector.finish()
    return results[min(results)]


async def acollect(events: AsyncIterator[ChatEvent]) -> ChatResult:
    collector = Collector()
    async for event in events:
        collector.add(event)
    results = collector.finish()
    return results[min(results)]
