"""LLMEngine features on the default model's real weights."""

from __future__ import annotations

import threading

import pytest
import torch

from rillm.core.request import RequestStatus
from rillm.sampling_params import InvalidParameterError, SamplingParams
from tests.engine.helpers import chat_ids, run

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def prompt(smollm_tokenizer):
    return chat_ids(smollm_tokenizer, "Describe a sunrise over the mountains.")


def test_max_tokens_ends_with_length_and_eos_with_stop(default_engine, prompt):
    out = run(default_engine, {"a": prompt}, SamplingParams(temperature=0, max_tokens=5))["a"]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
    short = run(default_engine, {"b": chat_ids(default_engine.tokenizer, "Say hi.")},
                SamplingParams(temperature=0, max_tokens=200))["b"]
    choice = short.outputs[0]
    assert choice.finish_reason == "stop"
    assert choice.token_ids[-1] in default_engine.model_config.eos_token_ids
    assert "<|im_end|>" not in choice.text


def test_stop_string_ends_the_text_before_it(default_engine, prompt):
    full = run(default_engine, {"a": prompt}, GREEDY)["a"].outputs[0].text
    words = full.split()
    stop = " " + words[len(words) // 2]
    cut = full.index(stop)
    out = run(default_engine, {"b": prompt},
              SamplingParams(temperature=0, max_tokens=40, stop=[stop]))["b"].outputs[0]
    assert out.text == full[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = run(default_engine, {"c": prompt}, SamplingParams(
        temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=True))["c"].outputs[0]
    assert kept.text == full[: cut + len(stop)]


def test_stop_token_ids_end_the_request(default_engine, prompt):
    full = run(default_engine, {"a": prompt}, GREEDY)["a"].outputs[0]
    stop_token = full.token_ids[6]
    out = run(default_engine, {"b": prompt}, SamplingParams(
        temperature=0, max_tokens=40, stop_token_ids=[stop_token]))["b"].outputs[0]
    first = full.token_ids.index(stop_token)
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token


def test_min_tokens_keeps_going_past_eos(default_engine):
    ids = chat_ids(default_engine.tokenizer, "Say hi.")
    out = run(default_engine, {"a": ids},
              SamplingParams(temperature=0, max_tokens=60, min_tokens=30))["a"].outputs[0]
    assert len(out.token_ids) >= 30
    eos = set(default_engine.model_config.eos_token_ids)
    assert not eos & set(out.token_ids[:30])


def test_logprobs_rank_and_top_tokens(default_engine, prompt):
    out = run(default_engine, {"a": prompt},
              SamplingParams(temperature=0, max_tokens=8, logprobs=5))["a"].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 8
    for token_id, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == token_id and lp.rank == 1
        assert len(lp.top) == 5 and lp.top[0][0] == token_id
        assert lp.top[0][1] == pytest.approx(lp.logprob)
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


def test_n_choices_share_the_prompt_blocks_and_differ(make_engine, prompt):
    engine = make_engine()
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12)
    engine.add_request("n", prompt, params)
    engine.step()
    running = engine.scheduler.running
    full_blocks = len(prompt) // engine.block_manager.block_size
    assert len(running) == 3
    assert running[0].block_ids[:full_blocks] == running[1].block_ids[:full_blocks] \
        == running[2].block_ids[:full_blocks]
    engine.abort_request("n")
    out = run(engine, {"m": prompt}, params)["m"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({c.token_ids for c in out.outputs}) == 3
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_cache_hit_skips_the_shared_prompt_and_keeps_the_answer(make_engine, prompt):
    engine = make_engine()
    first = run(engine, {"a": prompt}, GREEDY)["a"]
    engine.add_request("b", prompt, GREEDY)
    engine.step()
    request = engine.scheduler.get("b#0")
    assert request is not None
    assert request.num_cached_tokens == (len(prompt) - 1) // 16 * 16 > 0
    while engine.has_unfinished_requests():
        engine.step()
    assert tuple(request.output_token_ids) == first.outputs[0].token_ids


def test_preemption_under_a_tiny_cache_keeps_outputs_exact(make_engine, smollm_tokenizer):
    prompts = {f"r{i}": chat_ids(smollm_tokenizer, f"Count from {i} to {i + 20}.")
               for i in range(4)}
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    # Exact on the float32 path; the default recomputes a preempted prompt in other batch shapes.
    roomy = run(make_engine(quantization="none"), prompts, params)
    tight = make_engine(num_kv_blocks=20, block_size=8, max_model_len=160,
                        quantization="none")
    squeezed = run(tight, prompts, params)
    assert tight.scheduler.num_preemptions > 0
    for rid in prompts:
        assert squeezed[rid].outputs[0].token_ids == roomy[rid].outputs[0].token_ids
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks


def test_abort_frees_every_block_at_once(make_engine, prompt):
    engine = make_engine()
    for i in range(4):
        engine.add_request(f"a{i}", prompt, SamplingParams(max_tokens=100))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request([f"a{i}" for i in range(4)])
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.step() == []


@pytest.mark.parametrize(
    "prompt_len, params, param",
    [
        (0, SamplingParams(), "prompt"),
        (5000, SamplingParams(), "prompt"),
        (100, SamplingParams(max_tokens=4000), "max_tokens"),
        (10, SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
        (10, SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ],
)
def test_requests_the_model_cannot_take_name_the_parameter(make_engine, prompt_len, params,
                                                            param):
    engine = make_engine(max_model_len=4096)
    with pytest.raises(InvalidParameterError) as err:
        engine.add_request("bad", [42] * prompt_len, params)
    assert err.value.param == param
    assert not engine.has_unfinished_requests()


def test_finished_status_names_match_openai_finish_reasons():
    assert RequestStatus.FINISHED_STOPPED.finish_reason == "stop"
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert RequestStatus.RUNNING.finish_reason is None


def test_steps_run_on_the_engines_threads_in_whichever_thread_steps(make_engine, prompt):
    """Torch keeps its thread count per thread: an engine stepped from a thread other than the
    one that built it still runs on its own count, and leaves other threads' alone."""
    before = torch.get_num_threads()
    seen = []
    try:
        engine = make_engine(num_threads=2)
        torch.set_num_threads(1)  # new threads start from this count

        def step_thread() -> None:
            engine.add_request("t", prompt, SamplingParams(max_tokens=2))
            while engine.has_unfinished_requests():
                engine.step()
            seen.append(torch.get_num_threads())

        thread = threading.Thread(target=step_thread)
        thread.start()
        thread.join()
        assert seen == [2]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_gpu_kv_cache_takes_what_the_fraction_leaves():
    from rillm.engine.llm_engine import blocks_for_gpu

    gib = 2**30
    # An 80 GiB card with 2 GiB in use (the model, the context): 0.9 of it leaves 70 GiB.
    assert blocks_for_gpu(78 * gib, 80 * gib, 0.9, gib) == 70
    # Another process holds most of the card: nothing left for the cache is an error, said.
    with pytest.raises(ValueError, match="gpu-memory-utilization 0.5"):
        blocks_for_gpu(30 * gib, 80 * gib, 0.5, gib)
