"""AsyncEngine: streaming deltas over asyncio, aborts, errors, many requests at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from rillm.engine.async_engine import AsyncEngine
from rillm.sampling_params import InvalidParameterError, SamplingParams
from tests.engine.helpers import chat_ids, run

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(make_engine):
    async_engine = AsyncEngine(make_engine())
    yield async_engine
    async_engine.shutdown()


def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 \
                and stats.num_free_blocks == stats.num_blocks:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.stats()}")


async def collect(engine, ids, params, request_id):
    deltas = []
    async for out in engine.generate(ids, params, request_id):
        deltas.append(out)
    return deltas


def test_stream_of_deltas_adds_up_to_the_sync_result(engine, make_engine, smollm_tokenizer):
    ids = chat_ids(smollm_tokenizer, "Name a planet.")
    deltas = asyncio.run(collect(engine, ids, GREEDY, "s1"))
    assert len(deltas) > 1 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    text = "".join(d.outputs[0].text for d in deltas)
    tokens = tuple(t for d in deltas for t in d.outputs[0].token_ids)
    expected = run(make_engine(), {"x": ids}, GREEDY)["x"].outputs[0]
    assert (text, tokens) == (expected.text, expected.token_ids)
    assert deltas[-1].outputs[0].finish_reason == "length"
    wait_idle(engine)


def test_sixteen_concurrent_streams_all_complete(engine, smollm_tokenizer):
    async def main():
        jobs = [
            collect(engine, chat_ids(smollm_tokenizer, f"Tell me a fact about {n}."),
                    SamplingParams(temperature=0.7, seed=n, max_tokens=12 + n), f"c{n}")
            for n in range(16)
        ]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for n, deltas in enumerate(results):
        assert deltas[-1].finished
        assert sum(len(d.outputs[0].token_ids) for d in deltas) <= 12 + n
    wait_idle(engine)


def test_leaving_a_stream_early_aborts_and_frees_blocks(engine, smollm_tokenizer):
    ids = chat_ids(smollm_tokenizer, "Write a long story about a dragon.")

    async def main():
        stream = engine.generate(ids, SamplingParams(max_tokens=500, ignore_eos=True), "early")
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()

    asyncio.run(main())
    wait_idle(engine)


def test_cancelled_tasks_abort_their_requests(engine, smollm_tokenizer):
    ids = chat_ids(smollm_tokenizer, "Write a long story about a knight.")

    async def main():
        tasks = [asyncio.create_task(collect(engine, ids, SamplingParams(
            max_tokens=500, ignore_eos=True), f"cancel{i}")) for i in range(6)]
        await asyncio.sleep(0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The engine goes straight on to new work.
        return await collect(engine, ids, SamplingParams(max_tokens=3), "after")

    deltas = asyncio.run(main())
    assert deltas[-1].finished
    wait_idle(engine)


def test_invalid_request_raises_before_any_output(engine):
    async def main():
        stream = engine.generate([5] * 20000, SamplingParams(), "too-long")
        with pytest.raises(InvalidParameterError) as err:
            await stream.__anext__()
        return err.value.param

    assert asyncio.run(main()) == "prompt"
    wait_idle(engine)


def test_slow_consumer_gets_every_token_merged(engine, smollm_tokenizer):
    ids = chat_ids(smollm_tokenizer, "Name three colours.")

    async def main():
        deltas = []
        async for out in engine.generate(ids, GREEDY, "slow"):
            deltas.append(out)
            await asyncio.sleep(0.3)  # several engine steps pass meanwhile
        return deltas

    deltas = asyncio.run(main())
    assert sum(len(d.outputs[0].token_ids) for d in deltas) == GREEDY.max_tokens
    assert len(deltas) < GREEDY.max_tokens
    wait_idle(engine)


def test_a_model_built_by_a_factory_is_built_on_the_thread_that_steps_it(make_engine,
                                                                         smollm_tokenizer):
    import threading

    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return make_engine()

    async_engine = AsyncEngine(build)
    try:
        assert built_on == ["rillm-engine"]
        ids = chat_ids(smollm_tokenizer, "Hi")
        deltas = asyncio.run(collect(async_engine, ids, GREEDY, "f"))
        assert deltas[-1].finished
    finally:
        async_engine.shutdown()


def test_a_factory_that_fails_raises_from_the_constructor():
    def build():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(build)


def test_a_request_that_fails_to_be_added_fails_alone(make_engine, smollm_tokenizer):
    """Anything add_request raises (not only a validation error) is that request's failure:
    the loop, and every other request, go on."""
    llm_engine = make_engine()
    add = llm_engine.add_request

    def add_request(request_id, *args, **kwargs):
        add(request_id, *args, **kwargs)  # half-added, then it breaks
        if request_id == "bad":
            raise RuntimeError("simulated failure while adding")

    llm_engine.add_request = add_request  # type: ignore[method-assign]
    async_engine = AsyncEngine(llm_engine)
    deaths = []
    async_engine.on_death = deaths.append
    ids = chat_ids(smollm_tokenizer, "Hi")

    async def main():
        good = asyncio.create_task(collect(async_engine, ids, GREEDY, "good"))
        with pytest.raises(RuntimeError, match="simulated failure"):
            await collect(async_engine, ids, GREEDY, "bad")
        return await good

    try:
        deltas = asyncio.run(main())
        assert deltas[-1].finished and async_engine.is_running and not deaths
        wait_idle(async_engine)  # the half-added request's blocks are free again
    finally:
        async_engine.shutdown()


def test_a_crashed_loop_calls_on_death_once(make_engine, smollm_tokenizer):
    llm_engine = make_engine()

    def failing_step():
        raise RuntimeError("simulated device failure")

    llm_engine.step = failing_step  # type: ignore[method-assign]
    async_engine = AsyncEngine(llm_engine)
    deaths = []
    async_engine.on_death = deaths.append

    async def main():
        with pytest.raises(Exception, match="simulated device failure"):
            await collect(async_engine, chat_ids(smollm_tokenizer, "Hi"), GREEDY, "r")

    asyncio.run(main())
    async_engine._thread.join(timeout=10)
    assert [str(e) for e in deaths] == ["simulated device failure"]
    assert not async_engine.is_running


def test_a_grammar_that_compiles_too_slowly_is_that_requests_400(engine, smollm_tokenizer):
    """The compile runs on the engine's one compile thread; past the timeout the request is
    refused (the compile finishes in the background, into the cache)."""
    from rillm.structured_outputs import StructuredOutputsParams

    schema = {"type": "object", "properties": {"slow": {"type": "integer"}}}
    params = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(
        json=schema))
    ids = chat_ids(smollm_tokenizer, "Hi")
    engine.grammar_compile_timeout = 1e-4
    try:
        with pytest.raises(InvalidParameterError, match="longer than") as error:
            asyncio.run(engine.validate(ids, params))
        assert error.value.param == "structured_outputs.json"
    finally:
        engine.grammar_compile_timeout = 10.0
    assert asyncio.run(engine.validate(ids, params)) == 8
