"""rillm.client against rillm serve, and against a foreign server shape we do not control
(a tiny fake: multi-token deltas, reasoning, tool calls, keep-alive comments, in-band error)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import openai
import pytest
import uvicorn
from openai import AsyncOpenAI, OpenAI
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from rillm.client import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallDelta,
    Usage,
    acollect,
    astream_chat,
    collect,
    stream_chat,
)
from tests.live_server import free_port

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_events_and_collect_against_rillm(server):
    client = OpenAI(api_key="EMPTY", base_url=server.v1)
    events = list(stream_chat(client, model="SmolLM2-135M-Instruct", messages=MESSAGES,
                              temperature=0, max_tokens=20))
    assert isinstance(events[-1], Usage) and isinstance(events[-2], Finish)
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    result = collect(iter(events))
    whole = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                           temperature=0, max_tokens=20)
    assert result.text == text == whole.choices[0].message.content
    assert result.finish_reason == whole.choices[0].finish_reason
    assert result.usage.completion_tokens == whole.usage.completion_tokens
    assert 0 < result.time_to_first_token <= result.duration
    assert len(result.inter_token_latencies) == sum(isinstance(e, ContentDelta)
                                                    for e in events) - 1
    assert result.tokens_per_second and result.tokens_per_second > 0


def test_async_collect_against_rillm(server):
    async def main():
        async with AsyncOpenAI(api_key="EMPTY", base_url=server.v1) as client:
            return await acollect(astream_chat(client, model="SmolLM2-135M-Instruct",
                                               messages=MESSAGES, temperature=0, max_tokens=8))

    result = asyncio.run(main())
    assert result.text and result.finish_reason in ("stop", "length")
    assert result.usage.completion_tokens <= 8


# -- a foreign server shape -----------------------------------------------------------------

def _chunk(delta: dict, finish: str | None = None) -> str:
    data = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(data)}\n\n"


async def _chat(request):
    body = await request.json()
    fail = body["messages"][-1]["content"] == "fail"

    async def events():
        yield _chunk({"role": "assistant"})
        yield ": keep-alive\n\n"
        yield _chunk({"reasoning_content": "Let me think. "})
        yield _chunk({"reasoning_content": "Done."})
        yield _chunk({"content": "Hello there, "})  # several tokens in one delta
        if fail:
            yield 'data: {"error": {"message": "model exploded", "type": "server_error"}}\n\n'
            yield "data: [DONE]\n\n"
            return
        yield ": keep-alive\n\n"
        yield _chunk({"content": "friend."})
        yield _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "lookup", "arguments": ""}}]})
        yield _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]})
        yield _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]})
        yield _chunk({}, "tool_calls")
        usage = {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}
        yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _models(_):
    return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    app = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"]),
                            Route("/v1/models", _models)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(5)


def test_foreign_stream_with_reasoning_tool_calls_and_keep_alives(fake_server):
    client = OpenAI(api_key="none", base_url=fake_server)
    events = list(stream_chat(client, model="fake", messages=[{"role": "user", "content": "hi"}]))
    kinds = [type(e) for e in events]
    assert kinds.count(ReasoningDelta) == 2 and kinds.count(ToolCallDelta) == 3
    result = collect(iter(events))
    assert result.reasoning == "Let me think. Done."
    assert result.text == "Hello there, friend."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in result.tool_calls] == [
        ("call_1", "lookup", {"q": "x"})]
    assert result.finish_reason == "tool_calls"
    assert result.usage.total_tokens == 12


def test_in_band_error_raises_after_the_text_so_far(fake_server):
    client = OpenAI(api_key="none", base_url=fake_server)
    seen = []
    with pytest.raises(openai.APIError, match="model exploded"):
        for event in stream_chat(client, model="fake",
                                 messages=[{"role": "user", "content": "fail"}]):
            seen.append(event)
    assert "".join(e.text for e in seen if isinstance(e, ContentDelta)) == "Hello there, "
