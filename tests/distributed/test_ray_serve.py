"""`rillm serve --data-parallel-size 2`: two engine replicas on a local Ray instance behind
rillm's own server, routed by prefix (rillm.distributed). Needs the `ray` extra, which
`make test` installs.

The openai SDK tests of tests/server/test_openai_sdk.py run here unchanged, against this
server (the `server` fixture below overrides theirs)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.live_server import Server, start_server
from tests.server.test_openai_sdk import *  # noqa: F403 - the same tests, against replicas

STATS_TIMEOUT = 15.0  # replicas report their load every 0.5 s, through Ray Serve's controller


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    yield from start_server("--data-parallel-size", "2", "--keepalive-interval", "1")


def replica_values(server: Server, name: str) -> dict[str, float]:
    """One metric per replica, by replica name."""
    values = {}
    for line in httpx.get(f"{server.base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            values[labels.split('replica="')[1].split('"')[0]] = float(value)
    return values


def wait_for(condition: Callable[[], bool], what: str, timeout: float = STATS_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def served_by(server: Server, before: dict[str, float], count: int) -> dict[str, float]:
    """Requests each replica started since `before`, once `count` have been counted."""
    def delta() -> dict[str, float]:
        now = replica_values(server, "rillm:replica_requests_total")
        return {r: now[r] - before.get(r, 0) for r in now}

    wait_for(lambda: sum(delta().values()) >= count, f"{count} requests counted")
    return delta()


def deaths(server: Server) -> float:
    for line in httpx.get(f"{server.base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("rillm:replica_deaths_total "):
            return float(line.rpartition(" ")[2])
    raise AssertionError("no rillm:replica_deaths_total in /metrics")


def idle(server: Server) -> bool:
    in_use = replica_values(server, "rillm:replica_kv_cache_blocks_in_use")
    running = replica_values(server, "rillm:replica_num_requests_running")
    routed = replica_values(server, "rillm:replica_in_flight")  # the router's own count
    return len(in_use) == 2 and not any(in_use.values()) and not any(running.values()) \
        and not any(routed.values())


def test_both_replicas_serve_and_are_reported(server):
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    assert "rillm:replicas 2.0" in metrics
    assert len(replica_values(server, "rillm:replica_requests_total")) == 2
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200


def test_concurrent_streams_reach_both_replicas(server):
    before = replica_values(server, "rillm:replica_requests_total")

    async def one(client: AsyncOpenAI, i: int) -> str:
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", stream=True, max_tokens=24,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 9}."}])
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        async with AsyncOpenAI(api_key="EMPTY", base_url=server.v1) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    assert all(asyncio.run(main()))
    served = served_by(server, before, 8)
    # Every prompt starts with the template's system prompt, which draws them to the replica
    # that served it before; the balance threshold (4 in flight) sends the rest elsewhere.
    assert min(served.values()) >= 1, served


def test_a_shared_prefix_goes_to_the_replica_that_holds_it(server):
    # Routed by load alone, each second question would find its document cached with
    # probability 1/2; all three finding it, 1/8.
    client = OpenAI(api_key="EMPTY", base_url=server.v1)
    for document in range(3):
        # About 150 tokens shared by both questions: the first 64 and more are full blocks.
        system = (f"You answer questions about document {document}. It lists the numbers "
                  + ", ".join(str(document * 1000 + i) for i in range(60)) + ".")
        for question in ("Which number comes first?", "Which number comes last?"):
            reply = client.chat.completions.create(
                model="SmolLM2-135M-Instruct", max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": system},
                          {"role": "user", "content": question}])
        cached = reply.usage.prompt_tokens_details.cached_tokens
        assert cached >= 64, f"document {document}: {cached} prompt tokens from the cache"


def test_a_disconnect_storm_leaves_no_blocks_on_any_replica(server):
    wait_for(lambda: idle(server), "replicas idle before the storm")
    body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": 500,
            "messages": [{"role": "user", "content": "Write a long story about the sea."}]}

    async def hang_up(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"content":"' in line \
                        and '"content":""' not in line:
                    break  # the answer is streaming; the client goes away

    async def storm() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            await asyncio.gather(*(hang_up(client) for _ in range(16)))

    before = replica_values(server, "rillm:replica_requests_total")
    asyncio.run(storm())
    served_by(server, before, 16)  # every request reached a replica before its client left
    wait_for(lambda: idle(server), "no KV block in use and nothing running on every replica")


def test_a_dead_replica_fails_only_its_own_requests(server):
    """Runs last in this module: the replica is replaced, which takes a while."""
    wait_for(lambda: idle(server), "replicas idle")
    pids = {}
    for line in httpx.get(f"{server.base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("rillm:replica_pid{"):
            pids[line.split('replica="')[1].split('"')[0]] = int(float(line.rpartition(" ")[2]))
    assert len(pids) == 2
    victim = sorted(pids)[0]
    async def stream(client: httpx.AsyncClient, kill_after: int | None) -> str:
        # A prompt neither replica has seen: no prefix draws it, the least loaded serves it.
        body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": 300,
                "ignore_eos": True,
                "prompt": f"{secrets.token_hex(12)} is the ship's name. Day one:"}
        text = ""
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                text += line + "\n"
                if kill_after is not None and text.count("data: ") == kill_after:
                    os.kill(pids[victim], signal.SIGKILL)
        return text

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            # Two streams at once: one lands on each replica (the least loaded serves); the
            # first kills its replica once it has five events.
            return await asyncio.gather(stream(client, 5), stream(client, None))

    results = asyncio.run(main())
    failed = [t for t in results if '"error"' in t]
    finished = [t for t in results if '"finish_reason":"length"' in t]
    assert len(failed) == 1 and len(finished) == 1, results
    assert failed[0].rstrip().endswith("data: [DONE]")  # the stream ended in order
    wait_for(lambda: deaths(server) >= 1, "the death reported in /metrics")
    # The server goes on: new requests are served (by the survivor, or the replacement).
    reply = OpenAI(api_key="EMPTY", base_url=server.v1).chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=4,
        messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
