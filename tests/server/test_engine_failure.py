"""An error after the stream began reaches the client as an error event, then [DONE]; the
server then reports itself unhealthy and asks to be stopped (`rillm serve` exits 1, for a
supervisor to restart it) instead of hanging. In-process, on a real engine whose
model step is made to fail mid-stream."""

from __future__ import annotations

import asyncio
import json

import httpx

from rillm.engine.async_engine import AsyncEngine
from rillm.server.app import ServerState, create_app
from rillm.server.config import ServerConfig


def test_engine_failure_mid_stream_ends_the_stream_with_an_error(make_engine):
    app, async_engine, failures = _failing_app(make_engine)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            response = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                "max_tokens": 20, "ignore_eos": True})
            health = await client.get("/health")
            after = await client.post("/v1/completions", json={"prompt": "Hi"})
            return response, health, after

    try:
        response, health, after = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert response.status_code == 200
    events = [b[len("data: "):] for b in response.text.split("\n\n") if b.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "simulated device failure" in error["message"]
    first = json.loads(events[0])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert health.status_code == 503
    assert after.status_code == 503 and "error" in after.json()
    assert len(failures) == 1 and "simulated device failure" in failures[0]


def _failing_app(make_engine):
    """An app on a real engine whose fourth model step fails; the failures it reports to
    `on_failure` (what `rillm serve` wires to stopping with exit code 1)."""
    engine = make_engine()
    calls = {"n": 0}
    execute = engine.runner.execute

    def failing_execute(scheduled):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated device failure")
        return execute(scheduled)

    engine.runner.execute = failing_execute  # type: ignore[method-assign]
    async_engine = AsyncEngine(engine)
    config = ServerConfig(served_model_names=("m",))
    state = ServerState(config, engine=async_engine)
    failures: list[str] = []
    state.on_failure = failures.append
    return create_app(config, lambda: async_engine, state), async_engine, failures


def _events_of_a_failing_stream(make_engine, path: str, body: dict
                                ) -> list[tuple[str, dict]]:
    """The (event name, data) pairs of a stream at `path` whose engine fails mid-way."""
    app, async_engine, _ = _failing_app(make_engine)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post(path, json=body)

    try:
        response = asyncio.run(main())
    finally:
        async_engine.shutdown()
    events = []
    for block in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_a_failure_mid_stream_ends_a_responses_stream_with_response_failed(make_engine):
    events = _events_of_a_failing_stream(make_engine, "/v1/responses", {
        "input": "Hi", "stream": True, "max_output_tokens": 20, "ignore_eos": True})
    names = [name for name, _ in events]
    assert names[0] == "response.created" and names[-1] == "response.failed"
    assert "response.completed" not in names
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed"
    assert "simulated device failure" in failed["error"]["message"]
    # Every item opened was closed before the failure was reported.
    assert names.count("response.output_item.added") == names.count("response.output_item.done")
    numbers = [data["sequence_number"] for _, data in events]
    assert numbers == list(range(len(numbers)))


def test_a_failure_mid_stream_ends_a_messages_stream_with_an_error_event(make_engine):
    events = _events_of_a_failing_stream(make_engine, "/v1/messages", {
        "model": "m", "max_tokens": 20, "stream": True, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Hi"}]})
    assert events[0][0] == "message_start" and events[-1][0] == "error"
    assert "message_stop" not in [name for name, _ in events]
    error = events[-1][1]
    assert error["type"] == "error" and "simulated device failure" in error["error"]["message"]
