"""Data parallelism on this machine: one engine against two replicas on Ray Serve, and what
prefix-aware routing saves over least-loaded routing on a shared-prefix workload.

    python -m bench.data_parallel throughput [--concurrency 16] [--num-prompts 64] [--rounds 2]
    python -m bench.data_parallel prefix [--prefixes 12] [--questions 6] [--prefix-len 512]

throughput: `rillm serve --num-threads 1` (one engine, one thread), `rillm serve
--data-parallel-size 2` (two replicas, one thread each) and `rillm serve` (one engine, every
core) run side by side and are measured interleaved by rillm's own `bench serve` machinery
(random prompts, completions, fixed output length): output tokens/s, TTFT, TPOT.

prefix: a fresh two-replica server per policy (prefix, then least-loaded), the same requests
in the same order: `--prefixes` long random prefixes (a system prompt, a document), each asked
`--questions` short questions, shuffled, at `--concurrency`. The KV cache is small
(`--kv-cache-space`) so that one replica holds about half of the prefixes: routing by prefix
keeps each prefix on one replica, routing by load makes both replicas hold (and evict) all of
them. Reports the prompt tokens served from the replicas' prefix caches (their /metrics), TTFT
and throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections.abc import Sequence

import httpx

from rillm.bench.serve import (
    Prompt,
    Target,
    Workload,
    make_prompts,
    run_benchmark,
    run_level,
    table,
)
from rillm.loader import default_model_path
from rillm.loader.tokenizer import load_gguf_tokenizer
from tests.live_server import Server, start_server


def replica_sums(server: Server) -> dict[str, float]:
    sums: dict[str, float] = {}
    for line in httpx.get(f"{server.base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("rillm:replica_") and "{" in line:
            name = line.split("{")[0]
            sums[name] = sums.get(name, 0.0) + float(line.rpartition(" ")[2])
    return sums


def throughput(args: argparse.Namespace) -> None:
    tokenizer = load_gguf_tokenizer(default_model_path())
    workload = Workload(endpoint="completions", dataset="random", input_len=args.input_len,
                        output_len=args.output_len, seed=args.seed)
    count = args.num_prompts
    prompts = make_prompts(tokenizer, workload, 1 + count * args.rounds)
    # One engine with one thread (what one replica gets here), two replicas with one thread
    # each, and one engine with every core (what a user of this machine would run instead).
    servers = {"1 engine, 1 thread": start_server("--num-threads", "1"),
               "2 replicas, 1 thread each": start_server("--data-parallel-size", "2"),
               "1 engine, all cores": start_server()}
    try:
        targets = [Target(name, next(server).v1) for name, server in servers.items()]
        results = asyncio.run(run_benchmark(targets, workload, prompts,
                                            [(args.concurrency, None, count)],
                                            rounds=args.rounds))
    finally:
        for server in servers.values():
            server.close()
    from rich.console import Console

    Console(width=160).print(table(results))
    by_name = {r.server: r for r in results}
    base = by_name[targets[0].name]
    for target in targets:
        r = by_name[target.name]
        print(f"{target.name:26s} c={args.concurrency}: {r.output_throughput:6.1f} out tok/s "
              f"({r.output_throughput / base.output_throughput:.2f}x), TTFT p50 "
              f"{r.ttft_ms['p50']:5.0f} ms, TPOT p50 {r.tpot_ms['p50']:5.1f} ms")


def shared_prefix_prompts(args: argparse.Namespace) -> list[Prompt]:
    tokenizer = load_gguf_tokenizer(default_model_path())
    rng = random.Random(args.seed)
    prefixes = make_prompts(tokenizer, Workload(input_len=args.prefix_len, seed=args.seed),
                            args.prefixes)
    tails = make_prompts(tokenizer, Workload(input_len=16, seed=args.seed + 1),
                         args.prefixes * args.questions)
    prompts = [Prompt(prefix.text + "\n\nQuestion: " + tails[p * args.questions + q].text,
                      prefix.num_tokens + 20)
               for p, prefix in enumerate(prefixes) for q in range(args.questions)]
    rng.shuffle(prompts)
    return prompts


def prefix(args: argparse.Namespace) -> None:
    prompts = shared_prefix_prompts(args)
    workload = Workload(endpoint="completions", output_len=args.output_len, seed=args.seed)
    rows = []
    for policy in ("prefix", "least-loaded"):
        server_iter = start_server("--data-parallel-size", "2", "--routing-policy", policy,
                                   "--kv-cache-space", str(args.kv_cache_space))
        server = next(server_iter)
        try:
            before = replica_sums(server)
            result = asyncio.run(_level(server, workload, prompts, args.concurrency))
            after = replica_sums(server)
        finally:
            server_iter.close()
        hits = after["rillm:replica_prefix_cache_hits_total"] - before.get(
            "rillm:replica_prefix_cache_hits_total", 0)
        queries = after["rillm:replica_prefix_cache_queries_total"] - before.get(
            "rillm:replica_prefix_cache_queries_total", 0)
        rows.append((policy, result, hits, queries))
    print(f"{len(prompts)} requests: {args.prefixes} prefixes of {args.prefix_len} tokens x "
          f"{args.questions} questions, c={args.concurrency}, output {args.output_len}, "
          f"KV cache {args.kv_cache_space} GiB per replica")
    for policy, result, hits, queries in rows:
        print(f"  {policy:13s} prompt tokens from cache {hits:7.0f} / {queries:7.0f} "
              f"({hits / max(queries, 1):.0%}), TTFT p50 {result.ttft_ms['p50']:6.0f} ms "
              f"mean {result.ttft_ms['mean']:6.0f} ms, {result.duration_s:5.1f} s, "
              f"{result.total_throughput:6.0f} tok/s in+out, failures {result.failures}")
    (_, fast, *_), (_, slow, *_) = rows
    print(f"  prefix / least-loaded: TTFT mean {fast.ttft_ms['mean'] / slow.ttft_ms['mean']:.2f}x"
          f", duration {fast.duration_s / slow.duration_s:.2f}x")


async def _level(server: Server, workload: Workload, prompts: Sequence[Prompt],
                 concurrency: int) -> object:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await run_level(client, Target("rillm", server.v1), "SmolLM2-135M-Instruct",
                               workload, prompts, concurrency, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--concurrency", type=int, default=16)
    t.add_argument("--num-prompts", type=int, default=64)
    t.add_argument("--input-len", type=int, default=128)
    t.add_argument("--output-len", type=int, default=128)
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prefix")
    p.add_argument("--prefixes", type=int, default=12)
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--kv-cache-space", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    {"throughput": throughput, "prefix": prefix}[args.command](args)


if __name__ == "__main__":
    main()
