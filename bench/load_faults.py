"""Soak and overload against a real `rillm serve` (the default model, loopback only).

    python -m bench.load_faults soak [--requests 1000] [--concurrency 32] [--cut 0.3]
                                     [--warmup 400]
    python -m bench.load_faults overload [--factor 10]

soak: streaming requests at a fixed concurrency, a fraction of them cut mid-stream at a
random point, after --warmup uncounted ones; reports leaked KV blocks, RSS sampled every
100 requests, and whether every uncut stream ended with a finish_reason and [DONE].

overload: the server's capacity (--max-num-seqs + --max-queued-requests) times `factor`
requests released at once: every admitted one must complete, the rest get 429 / 503 with
Retry-After, and admitted latency (p50 / p99) is compared with an unloaded run of the same
number of requests (the capacity, released at once, nothing else arriving).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

from bench.startup_memory import rss_mib
from tests.live_server import read_metrics, start_server, wait_until_idle


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, cut_after: int | None
                     ) -> tuple[int, bool, float]:
    """(status, complete, seconds): complete = a finish_reason and [DONE] arrived."""
    began = time.monotonic()
    events = 0
    finished = done = False
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, False, time.monotonic() - began
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            events += 1
            choices = json.loads(line[6:]).get("choices") or []
            finished = finished or any(c.get("finish_reason") for c in choices)
            if cut_after is not None and events >= cut_after:
                break  # leaving the block closes the connection mid-stream
    return 200, finished and done, time.monotonic() - began


async def soak(args: argparse.Namespace) -> None:
    gen = start_server("--max-num-seqs", str(args.concurrency))
    server = next(gen)
    rng = random.Random(args.seed)
    url = f"{server.v1}/completions"
    samples: list[tuple[int, float]] = []
    uncut_incomplete = 0
    failures = 0
    done_count = 0
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            semaphore = asyncio.Semaphore(args.concurrency)

            async def one(i: int, measured: bool = True) -> None:
                nonlocal uncut_incomplete, failures, done_count
                cut = rng.randrange(1, 48) if rng.random() < args.cut else None
                body = {"prompt": f"Story {i}: once upon a time", "stream": True,
                        "max_tokens": rng.randrange(16, 64), "ignore_eos": True}
                async with semaphore:
                    status, complete, _ = await stream_one(client, url, body, cut)
                if not measured:
                    return
                if status != 200:
                    failures += 1
                elif cut is None and not complete:
                    uncut_incomplete += 1
                done_count += 1
                if done_count % 100 == 0:
                    samples.append((done_count, rss_mib(server.process.pid)[0]))

            # Warm-up, not counted: the KV pool's pages are committed lazily, each the first
            # time a block is written, so RSS climbs until every block has been handed out.
            await asyncio.gather(*(one(-i, measured=False) for i in range(1, args.warmup + 1)))
            began = time.monotonic()
            await asyncio.gather(*(one(i) for i in range(args.requests)))
            seconds = time.monotonic() - began
        metrics = wait_until_idle(server, timeout=30)
        after = [rss for _, rss in samples]
        spread = (max(after) - min(after)) / min(after) if after else float("nan")
        print(f"soak: {args.requests} streams at c={args.concurrency}, {args.cut:.0%} cut, "
              f"{seconds:.0f} s; non-200: {failures}; uncut streams incomplete: "
              f"{uncut_incomplete}; KV blocks in use after: "
              f"{metrics['rillm:kv_cache_blocks_in_use']:g}; running/waiting after: "
              f"{metrics['rillm:num_requests_running']:g}/"
              f"{metrics['rillm:num_requests_waiting']:g}")
        print("RSS MiB every 100 requests: " + ", ".join(f"{rss:.0f}" for _, rss in samples))
        print(f"RSS after {args.warmup} warm-up requests: {min(after):.0f}-{max(after):.0f} "
              f"MiB, spread {spread:.1%}")
    finally:
        gen.close()


async def post_json(base_url: str, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one POST on a connection of its own, written by hand: the
    load generator shares the server's 2 cores, and httpx spends ~10 ms of CPU a request
    (2.8 s for a burst of 288), which would be counted as the server's latency."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    raw = await reader.read()  # to the server's close
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, payload


async def burst(base_url: str, count: int, body: dict
                ) -> list[tuple[int, bool, float, str | None]]:
    async def one() -> tuple[int, bool, float, str | None]:
        began = time.monotonic()
        status, headers, payload = await post_json(base_url, "/v1/completions", body)
        ok = status == 200 and \
            json.loads(payload)["usage"]["completion_tokens"] == body["max_tokens"]
        return status, ok, time.monotonic() - began, headers.get("retry-after")

    return await asyncio.gather(*(one() for _ in range(count)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def overload(args: argparse.Namespace) -> None:
    gen = start_server("--max-num-seqs", str(args.max_num_seqs), "--max-queued-requests",
                       str(args.max_queued))
    server = next(gen)
    capacity = args.max_num_seqs + args.max_queued
    body = {"prompt": "Count to a hundred:", "max_tokens": args.output_len, "ignore_eos": True}
    try:
        await burst(server.base_url, 4, {**body, "max_tokens": 4})  # warm-up
        unloaded = await burst(server.base_url, capacity, body)
        rss_before = rss_mib(server.process.pid)[0]
        began = time.monotonic()
        loaded = await burst(server.base_url, capacity * args.factor, body)
        seconds = time.monotonic() - began
        metrics = wait_until_idle(server, timeout=30)
        alive = server.process.poll() is None
        base = [t for status, ok, t, _ in unloaded if status == 200]
        admitted = [(ok, t) for status, ok, t, _ in loaded if status == 200]
        refused = [(status, retry) for status, _, _, retry in loaded if status != 200]
        statuses = sorted({status for status, _ in refused})
        print(f"overload: capacity {capacity} (max-num-seqs {args.max_num_seqs} + queue "
              f"{args.max_queued}), {capacity * args.factor} requests at once, "
              f"{args.output_len} tokens each, {seconds:.1f} s")
        print(f"unloaded ({len(base)} requests at once): latency p50 "
              f"{statistics.median(base):.2f} s, p99 {percentile(base, 0.99):.2f} s")
        print(f"admitted {len(admitted)}, all complete: {all(ok for ok, _ in admitted)}; "
              f"latency p50 {statistics.median([t for _, t in admitted]):.2f} s, p99 "
              f"{percentile([t for _, t in admitted], 0.99):.2f} s "
              f"({percentile([t for _, t in admitted], 0.99) / percentile(base, 0.99):.2f}x "
              f"unloaded p99)")
        print(f"refused {len(refused)}: statuses {statuses}, all with Retry-After: "
              f"{all(retry for _, retry in refused)}")
        active = read_metrics(server)["rillm:num_http_requests_active"]
        print(f"server alive: {alive}; RSS {rss_before:.0f} -> "
              f"{rss_mib(server.process.pid)[0]:.0f} MiB; KV blocks in use after: "
              f"{metrics['rillm:kv_cache_blocks_in_use']:g}; HTTP requests active after: "
              f"{active:g}")
    finally:
        gen.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("soak")
    s.add_argument("--requests", type=int, default=1000)
    s.add_argument("--concurrency", type=int, default=32)
    s.add_argument("--cut", type=float, default=0.3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--warmup", type=int, default=400,
                   help="streams of the same mix run first and not counted")
    o = commands.add_parser("overload")
    o.add_argument("--factor", type=int, default=10)
    o.add_argument("--max-num-seqs", type=int, default=16)
    o.add_argument("--max-queued", type=int, default=16)
    o.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(soak(args) if args.command == "soak" else overload(args))


if __name__ == "__main__":
    main()
