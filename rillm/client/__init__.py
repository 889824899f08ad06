"""Streaming client helpers for any OpenAI-compatible server (built on the openai SDK).

    from openai import OpenAI
    from rillm.client import stream_chat, collect, ContentDelta

    client = OpenAI(api_key="EMPTY", base_url="http://localhost:8000/v1")
    for event in stream_chat(client, model="m", messages=[{"role": "user", "content": "Hi"}]):
        if isinstance(event, ContentDelta):
            print(event.text, end="", flush=True)

    result = collect(stream_chat(client, model="m", messages=[...]))
    result.text, result.reasoning, result.finish_reason, result.usage, result.time_to_first_token
"""

from rillm.client.events import (
    ChatEvent,
    ChatResult,
    Collector,
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    acollect,
    astream_chat,
    chunk_events,
    collect,
    stream_chat,
)

__all__ = [
    "ChatEvent", "ChatResult", "Collector", "ContentDelta", "Finish", "ReasoningDelta",
    "ToolCall", "ToolCallDelta", "Usage", "acollect", "astream_chat", "chunk_events", "collect",
    "stream_chat",
]
