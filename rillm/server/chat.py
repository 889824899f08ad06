"""POST /v1/chat/completions, streaming and not, to the streaming contract in DESIGN.md."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from rillm.engine.async_engine import AsyncEngine
from rillm.outputs import RequestOutput
from rillm.sampling_params import MAX_LOGPROBS, InvalidParameterError
from rillm.server.errors import APIError
from rillm.server.generation import Generation, error_event, run_until_disconnect
from rillm.server.params import check_context, sampling_params
from rillm.server.protocol import ChatCompletionRequest, ChatMessage
from rillm.server.streaming import DONE, KEEPALIVE, logprob_entries


def render_chat(state: Any, engine: AsyncEngine, messages: Sequence[ChatMessage],
                add_generation_prompt: bool, chat_template: str | None) -> str:
    template = chat_template or state.config.chat_template or engine.engine.chat_template
    if not template:
        raise APIError(400, "this model has no chat template; use /v1/completions or start "
                       "the server with --chat-template", param="messages")
    conversation = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        conversation.append(entry)
    try:
        text = engine.tokenizer.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise APIError(400, f"the chat template rejected these messages: {exc}",
                       param="messages") from None
    return str(text)


async def create_chat_completion(state: Any, engine: AsyncEngine, body: ChatCompletionRequest,
                                 request: Request) -> Response:
    state.check_model(body.model)
    text = render_chat(state, engine, body.messages, body.add_generation_prompt,
                       body.chat_template)
    prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
    max_model_len = engine.engine.max_model_len
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{param} must be at least 1", param=param)
    check_context(len(prompt_ids), max_tokens, max_model_len, param)
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}",
                       param="top_logprobs")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, logprobs)
    try:
        engine.engine.validate(prompt_ids, params)
    except InvalidParameterError as exc:
        raise APIError.from_invalid(exc) from None

    generation = Generation(state, engine, f"chatcmpl-{uuid.uuid4().hex}", body.model
                            or state.model_name, prompt_ids, params)
    if body.stream:
        interval = body.stream_interval or state.config.stream_interval
        options = body.stream_options
        return generation.stream_response(_chat_stream(
            generation, interval,
            include_usage=bool(options and options.include_usage),
            continuous_usage=bool(options and options.continuous_usage_stats),
            logprobs=body.logprobs,
        ))
    final = await run_until_disconnect(request, generation.collect())
    return JSONResponse(_chat_response(generation, final, body.logprobs))


def _chat_response(generation: Generation, final: RequestOutput, logprobs: bool
                   ) -> dict[str, Any]:
    tokenizer = generation.engine.tokenizer
    choices = []
    for choice in final.outputs:
        choices.append({
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": ({"content": logprob_entries(tokenizer, choice.logprobs or ())}
                         if logprobs else None),
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        })
    return {
        "id": generation.response_id,
        "object": "chat.completion",
        "created": generation.created,
        "model": generation.model,
        "choices": choices,
        "usage": generation.usage(final),
    }


async def _chat_stream(generation: Generation, interval: int, *, include_usage: bool,
                       continuous_usage: bool, logprobs: bool) -> AsyncIterator[str]:
    tokenizer = generation.engine.tokenizer
    completion_tokens = 0
    obj = "chat.completion.chunk"

    def chunk(choice: dict[str, Any]) -> str:
        return generation.event(obj, [choice], completion_tokens if continuous_usage else None)

    try:
        for index in range(generation.params.n):
            yield chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None})
        async for piece in generation.pieces(interval):
            if piece is None:
                yield KEEPALIVE
                continue
            completion_tokens = piece.completion_tokens
            if piece.text or (logprobs and piece.logprobs):
                yield chunk({
                    "index": piece.index, "delta": {"content": piece.text},
                    "logprobs": ({"content": logprob_entries(tokenizer, piece.logprobs)}
                                 if logprobs else None),
                    "finish_reason": None,
                })
            if piece.finish_reason is not None:
                yield chunk({"index": piece.index, "delta": {}, "logprobs": None,
                             "finish_reason": piece.finish_reason,
                             "stop_reason": piece.stop_reason})
        if include_usage:
            yield generation.event(obj, [], completion_tokens)
    except Exception as exc:  # noqa: BLE001 - after the 200, errors travel in the stream
        yield error_event(exc)
    yield DONE
