"""Driving an LLMEngine to completion in tests."""

from __future__ import annotations

from rillm.engine.llm_engine import LLMEngine
from rillm.outputs import CompletionOutput, RequestOutput
from rillm.sampling_params import SamplingParams


def run(engine: LLMEngine, prompts: dict[str, list[int]], params: SamplingParams | dict
        ) -> dict[str, RequestOutput]:
    """Submit every prompt at once and step until all finish; whole outputs by request id."""
    for request_id, ids in prompts.items():
        p = params[request_id] if isinstance(params, dict) else params
        engine.add_request(request_id, ids, p)
    done: dict[str, RequestOutput] = {}
    chunks: dict[str, dict[int, list[CompletionOutput]]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        assert steps < 10_000
        for out in engine.step():
            for c in out.outputs:
                chunks.setdefault(out.request_id, {}).setdefault(c.index, []).append(c)
            if out.finished:
                done[out.request_id] = out
    result = {}
    for request_id, out in done.items():
        merged = []
        for index, parts in sorted(chunks[request_id].items()):
            logprobs = [lp for p in parts for lp in (p.logprobs or ())]
            merged.append(CompletionOutput(
                index=index,
                text="".join(p.text for p in parts),
                token_ids=tuple(t for p in parts for t in p.token_ids),
                logprobs=tuple(logprobs) if parts[0].logprobs is not None else None,
                finish_reason=parts[-1].finish_reason,
                stop_reason=parts[-1].stop_reason,
            ))
        result[request_id] = RequestOutput(request_id, out.prompt_token_ids, tuple(merged), True)
    return result


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(rendered, add_special_tokens=False)
