"""POST /v1/completions: text in (a string, strings, or token ids), text out."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from rillm.engine.protocol import ServingEngine
from rillm.outputs import Logprob, RequestOutput
from rillm.sampling_params import MAX_LOGPROBS
from rillm.server.errors import APIError
from rillm.server.generation import Generation, admit, error_event, run_until_disconnect
from rillm.server.offload import encode, encode_all
from rillm.server.params import sampling_params, structured_outputs
from rillm.server.protocol import CompletionRequest
from rillm.server.sse import DONE, KEEPALIVE
from rillm.server.streaming import token_text

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for this endpoint."""

MAX_SEQUENCES = 1024
"""The most sequences one request may start: prompts in its list times `n`. Without it one
small request could queue ~128,000 of them (and tokenize its whole list on the event loop)."""


def sequence_count(prompt: Any, n: int) -> int:
    """How many sequences a request's prompt starts: n for one prompt (a string or token
    ids), n for each prompt of a list."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return n
    return len(prompt) * n


async def _prompts(engine: ServingEngine, prompt: Any, n: int) -> list[list[int]]:
    """The prompt's token ids, one list a prompt; how many sequences they start (times `n`)
    is checked before any of them is tokenized."""
    if isinstance(prompt, str):
        return [await encode(engine.tokenizer, prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if sequence_count(prompt, n) > MAX_SEQUENCES:
        raise APIError(400, f"{len(prompt)} prompts x n={n} is more than the {MAX_SEQUENCES} "
                       "sequences one request may start", param="prompt")
    if isinstance(prompt[0], str):
        return await encode_all(engine.tokenizer, prompt)
    return [list(p) for p in prompt]


async def create_completion(state: Any, engine: ServingEngine, body: CompletionRequest,
                            request: Request) -> Response:
    state.check_model(body.model)
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of must equal n (no server-side ranking)", param="best_of")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs")
    prompts = await _prompts(engine, body.prompt, body.n)
    defaults = state.config.sampling_defaults
    max_tokens = int(defaults.get("max_new_tokens", DEFAULT_MAX_TOKENS)) \
        if body.max_tokens is None else body.max_tokens
    if max_tokens < 1:
        raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
    if any(not ids for ids in prompts):
        raise APIError(400, "a prompt is empty", param="prompt")
    params = sampling_params(body, max_tokens, body.logprobs, structured_outputs(body),
                             defaults)
    limits = await admit(engine, prompts, params)
    generation = Generation(state, engine, f"cmpl-{uuid.uuid4().hex}",
                            body.model or state.model_name, prompts, params, limits,
                            request.headers.get("x-request-id"))
    echoes = [str(engine.tokenizer.decode(ids)) if body.echo else "" for ids in prompts]
    if body.stream:
        options = body.stream_options
        return generation.stream_response(_stream(
            generation, body.stream_interval or state.config.stream_interval, echoes,
            include_usage=bool(options and options.include_usage),
            continuous_usage=bool(options and options.continuous_usage_stats),
            logprobs=body.logprobs is not None,
        ))
    final = await run_until_disconnect(request, generation.collect())
    return JSONResponse(_response(generation, final, echoes, body.logprobs is not None))


def _response(generation: Generation, final: RequestOutput, echoes: list[str],
              logprobs: bool) -> dict[str, Any]:
    tokenizer = generation.engine.tokenizer
    n = generation.params.n
    choices = []
    for choice in final.outputs:
        prefix = echoes[choice.index // n]
        choices.append({
            "index": choice.index,
            "text": prefix + choice.text,
            "logprobs": (_logprobs(tokenizer, choice.logprobs or (), len(prefix))
                         if logprobs else None),
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        })
    return {"id": generation.response_id, "object": "text_completion",
            "created": generation.created, "model": generation.model, "choices": choices,
            "usage": generation.usage(final)}


def _logprobs(tokenizer: Any, logprobs: Sequence[Logprob], offset: int) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({token_text(tokenizer, t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


async def _stream(generation: Generation, interval: int, echoes: list[str], *,
                  include_usage: bool, continuous_usage: bool, logprobs: bool
                  ) -> AsyncIterator[str]:
    tokenizer = generation.engine.tokenizer
    n = generation.params.n
    # Characters each choice has sent so far: the text_offset of its next token.
    offsets = [0] * (n * len(generation.prompts))
    completion_tokens = 0
    obj = "text_completion"

    def chunk(choice: dict[str, Any]) -> str:
        return generation.event(obj, [choice], completion_tokens if continuous_usage else None)

    try:
        async for piece in generation.pieces(interval):
            if piece is None:
                yield KEEPALIVE
                continue
            completion_tokens = piece.completion_tokens
            echo = echoes[piece.index // n] if piece.first else ""
            text = echo + piece.text
            if text or (logprobs and piece.logprobs):
                lp = (_logprobs(tokenizer, piece.logprobs, offsets[piece.index] + len(echo))
                      if logprobs else None)
                offsets[piece.index] += len(text)
                yield chunk({"index": piece.index, "text": text, "logprobs": lp,
                             "finish_reason": None})
            if piece.finish_reason is not None:
                yield chunk({"index": piece.index, "text": "", "logprobs": None,
                             "finish_reason": piece.finish_reason,
                             "stop_reason": piece.stop_reason})
        if include_usage:
            yield generation.event(obj, [], completion_tokens)
    except Exception as exc:  # noqa: BLE001 - after the 200, errors travel in the stream
        yield error_event(exc)
    yield DONE
