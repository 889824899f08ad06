"""`rillm bench serve`: load any OpenAI-compatible servers with streaming requests and report
what `vllm bench serve` reports — output and total tokens/s, TTFT, TPOT, ITL, end-to-end
latency (mean, p50, p90, p99) and failures — as a table, as JSON and as a plot.

Several servers are measured in one run, interleaved level by level (concurrency 1 on each,
then 8 on each, ...), with the order rotating, so drift of a shared machine hits all alike.

Time to first token is the time to the first chunk that carries text (or reasoning), not to
an empty role chunk; TPOT is (latency - TTFT) / (output tokens - 1) per request; ITL is the
gap between consecutive chunks that carry text (several tokens in one chunk count as one gap,
as vLLM's benchmark does).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import httpx

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str
    """…/v1"""
    model: str | None = None
    """None: the first model the server lists."""
    api_key: str | None = None


@dataclass(frozen=True)
class Workload:
    endpoint: str = "completions"
    """completions or chat."""
    dataset: str = "random"
    """random (a fresh random prompt per request), fixed (one random prompt for all) or
    conversations (the built-in set of real questions)."""
    input_len: int = 128
    output_len: int | None = 128
    """max_tokens; None: natural lengths (up to the server's limit)."""
    ignore_eos: bool = True
    """Generate exactly output_len tokens (ignored with natural lengths)."""
    seed: int = 0


@dataclass(frozen=True)
class Prompt:
    text: str
    num_tokens: int


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass
class LevelResult:
    server: str
    concurrency: int | None
    request_rate: float | None
    num_requests: int
    completed: int
    failures: int
    duration_s: float
    output_tokens: int
    input_tokens: int
    output_throughput: float
    total_throughput: float
    request_throughput: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]
    errors: list[str] = field(default_factory=list)


def stats_ms(values: Sequence[float]) -> dict[str, float]:
    """mean and p50/p90/p99 in milliseconds (NaN when there is nothing to summarize)."""
    if not values:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    ordered = sorted(values)
    out = {"mean": statistics.fmean(ordered) * 1000}
    for p in PERCENTILES:
        # Linear interpolation between closest ranks, as numpy.percentile does by default.
        rank = (len(ordered) - 1) * p / 100
        low, high = math.floor(rank), math.ceil(rank)
        value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
        out[f"p{p}"] = value * 1000
    return out


# -- prompts -------------------------------------------------------------------------------

def conversation_prompts() -> list[str]:
    data = resources.files("rillm.bench").joinpath("data/conversations.json").read_text("utf-8")
    return list(json.loads(data))


def make_prompts(tokenizer: Any, workload: Workload, count: int) -> list[Prompt]:
    """`count` prompts; random ones are random tokens of the vocabulary, decoded to text and
    re-encoded to count them (a few tokens may merge, as in vLLM's random dataset)."""
    rng = random.Random(workload.seed)
    if workload.dataset == "conversations":
        texts = conversation_prompts()
        rng.shuffle(texts)
        chosen = [texts[i % len(texts)] for i in range(count)]
        return [Prompt(t, len(tokenizer.encode(t, add_special_tokens=False))) for t in chosen]
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]

    def random_prompt() -> Prompt:
        ids = [rng.choice(vocab) for _ in range(workload.input_len)]
        text = tokenizer.decode(ids)
        return Prompt(text, len(tokenizer.encode(text, add_special_tokens=False)))

    if workload.dataset == "fixed":
        return [random_prompt()] * count
    if workload.dataset == "random":
        return [random_prompt() for _ in range(count)]
    raise ValueError(f"unknown dataset {workload.dataset!r}: random, fixed or conversations")


# -- one request ---------------------------------------------------------------------------

def request_body(workload: Workload, model: str, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True, "temperature": 0.0,
                            "stream_options": {"include_usage": True}}
    if workload.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    if workload.output_len is not None:
        body["max_tokens"] = workload.output_len
        if workload.ignore_eos:
            body["ignore_eos"] = True
    return body


async def send(client: httpx.AsyncClient, target: Target, model: str, workload: Workload,
               prompt: Prompt) -> RequestResult:
    path = "/chat/completions" if workload.endpoint == "chat" else "/completions"
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    result = RequestResult(ok=False, prompt_tokens=prompt.num_tokens)
    start = time.perf_counter()
    last = None
    text_chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", target.base_url + path, headers=headers,
                                 json=request_body(workload, model, prompt)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    return result
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens", usage_tokens)
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens",
                                                              result.prompt_tokens)
                if not any(_has_text(choice) for choice in chunk.get("choices") or ()):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                text_chunks += 1
    except (httpx.HTTPError, ValueError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else text_chunks
    result.ok = last is not None
    if not result.ok:
        result.error = "the stream carried no text"
    return result


def _has_text(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    if delta is not None:
        return bool(delta.get("content") or delta.get("reasoning")
                    or delta.get("reasoning_content"))
    return bool(choice.get("text"))


# -- one level -----------------------------------------------------------------------------

async def run_level(client: httpx.AsyncClient, target: Target, model: str, workload: Workload,
                    prompts: Sequence[Prompt], concurrency: int | None,
                    request_rate: float | None, on_done: Any = None) -> LevelResult:
    """Send every prompt, at most `concurrency` at a time, arriving as a Poisson process of
    `request_rate` per second (None: all at once)."""
    limit = asyncio.Semaphore(concurrency or len(prompts))
    rng = random.Random(workload.seed + 1)

    async def one(prompt: Prompt) -> RequestResult:
        async with limit:
            result = await send(client, target, model, workload, prompt)
        if on_done is not None:
            on_done()
        return result

    start = time.perf_counter()
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(one(prompt)))
        if request_rate is not None and request_rate != math.inf:
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    return summarize(target.name, concurrency, request_rate, results, duration)


def summarize(server: str, concurrency: int | None, request_rate: float | None,
              results: Sequence[RequestResult], duration: float) -> LevelResult:
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    inputs = sum(r.prompt_tokens for r in done)
    return LevelResult(
        server=server, concurrency=concurrency, request_rate=request_rate,
        num_requests=len(results), completed=len(done), failures=len(results) - len(done),
        duration_s=duration, output_tokens=output, input_tokens=inputs,
        output_throughput=output / duration, total_throughput=(output + inputs) / duration,
        request_throughput=len(done) / duration,
        ttft_ms=stats_ms([r.ttft for r in done]),
        tpot_ms=stats_ms([t for r in done if (t := r.tpot) is not None]),
        itl_ms=stats_ms([gap for r in done for gap in r.itls]),
        e2el_ms=stats_ms([r.latency for r in done]),
        errors=sorted({r.error for r in results if not r.ok})[:5],
    )


async def served_model(client: httpx.AsyncClient, target: Target) -> str:
    if target.model:
        return target.model
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    response = await client.get(target.base_url + "/models", headers=headers)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


async def run_benchmark(targets: Sequence[Target], workload: Workload, prompts: Sequence[Prompt],
                        levels: Sequence[tuple[int | None, float | None, int]], rounds: int = 1,
                        warmup: int = 1, progress: Any = None, timeout: float = 600.0
                        ) -> list[LevelResult]:
    """Every (concurrency, request rate, number of requests) level on every server,
    interleaved. Each level of each round sends its own prompts (`prompts_needed` of them in
    all; see `level_prompts`), the same ones to every server."""
    results: list[LevelResult] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        models = {t.name: await served_model(client, t) for t in targets}
        for target in targets:
            for prompt in prompts[:warmup]:
                await send(client, target, models[target.name], workload, prompt)
        order = list(targets)
        slices = iter(level_prompts(prompts, [count for _, _, count in levels] * rounds,
                                    warmup))
        for _ in range(rounds):
            for concurrency, rate, count in levels:
                sent = next(slices)
                for target in order:
                    task = None
                    if progress is not None:
                        label = f"{target.name} c={concurrency or '∞'}"
                        if rate is not None:
                            label += f" rate={rate:g}/s"
                        task = progress.add_task(label, total=count)

                    def advance(task: Any = task) -> None:
                        if progress is not None:
                            progress.advance(task)

                    results.append(await run_level(client, target, models[target.name],
                                                   workload, sent, concurrency, rate, advance))
                order = order[1:] + order[:1]
    return merge_rounds(results)


def prompts_needed(counts: Sequence[int], warmup: int = 1) -> int:
    return warmup + sum(counts)


def level_prompts(prompts: Sequence[Prompt], counts: Sequence[int], warmup: int = 1
                  ) -> list[Sequence[Prompt]]:
    """Consecutive, disjoint slices of `prompts` after the warm-up ones, one per level run
    (`counts` in run order), so no level repeats a prompt another level (or the warm-up) sent:
    a server's prefix cache would answer a repeated prompt without its prefill."""
    if len(prompts) < prompts_needed(counts, warmup):
        raise ValueError(f"{prompts_needed(counts, warmup)} prompts needed, {len(prompts)} given")
    slices, start = [], warmup
    for count in counts:
        slices.append(prompts[start:start + count])
        start += count
    return slices


def merge_rounds(results: list[LevelResult]) -> list[LevelResult]:
    """With several rounds, keep the per-level result with the median output throughput."""
    groups: dict[tuple[str, int | None, float | None], list[LevelResult]] = {}
    for r in results:
        groups.setdefault((r.server, r.concurrency, r.request_rate), []).append(r)
    merged = []
    for group in groups.values():
        group.sort(key=lambda r: r.output_throughput)
        merged.append(group[len(group) // 2])
    return merged


# -- reporting -----------------------------------------------------------------------------

def table(results: Sequence[LevelResult]) -> Any:
    from rich.table import Table

    t = Table(title="rillm bench serve", show_lines=False)
    for column in ("server", "conc.", "rate", "done/fail", "out tok/s", "total tok/s",
                   "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "ITL p50 ms",
                   "E2E p50 s"):
        t.add_column(column, justify="left" if column == "server" else "right")
    for r in sorted(results, key=lambda r: (r.concurrency or 0, r.request_rate or 0, r.server)):
        t.add_row(
            r.server, str(r.concurrency or "∞"),
            "∞" if r.request_rate in (None, math.inf) else f"{r.request_rate:g}",
            f"{r.completed}/{r.failures}", f"{r.output_throughput:.1f}",
            f"{r.total_throughput:.1f}", f"{r.ttft_ms['p50']:.1f}", f"{r.ttft_ms['p99']:.1f}",
            f"{r.tpot_ms['p50']:.2f}", f"{r.tpot_ms['p99']:.2f}", f"{r.itl_ms['p50']:.2f}",
            f"{r.e2el_ms['p50'] / 1000:.2f}",
        )
    return t


def to_json(results: Sequence[LevelResult], workload: Workload, targets: Sequence[Target]
            ) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "workload": asdict(workload),
        "servers": [{"name": t.name, "base_url": t.base_url, "model": t.model} for t in targets],
        "results": [asdict(r) for r in results],
    }


def plot(results: Sequence[LevelResult], path: str) -> None:
    """Output tokens/s, TTFT p50 and TPOT p50 against concurrency, one line per server."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("output tokens/s", lambda r: r.output_throughput),
              ("TTFT p50 (ms)", lambda r: r.ttft_ms["p50"]),
              ("TPOT p50 (ms)", lambda r: r.tpot_ms["p50"]))
    servers = sorted({r.server for r in results})
    for axis, (label, value) in zip(axes, panels, strict=True):
        for server in servers:
            points = sorted((r.concurrency or 0, value(r)) for r in results
                            if r.server == server and r.request_rate is None)
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                          label=server)
        axis.set_xscale("log", base=2)
        levels = sorted({r.concurrency or 0 for r in results})
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("concurrency")
        axis.set_title(label)
        axis.grid(True, alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
