"""POST /v1/chat/completions, streaming and not, to the streaming contract in DESIGN.md."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from rillm.engine.protocol import ServingEngine
from rillm.outputs import RequestOutput
from rillm.parsers.message import MessageDelta, count_reasoning_tokens, parse_whole
from rillm.sampling_params import MAX_LOGPROBS
from rillm.server.chat_output import ChatOutputPlan, plan_chat_output, template_kwargs
from rillm.server.errors import APIError
from rillm.server.generation import (
    Generation,
    StreamPiece,
    admit,
    error_event,
    run_until_disconnect,
)
from rillm.server.offload import INLINE_CHARS, encode, off_loop
from rillm.server.params import sampling_params, structured_outputs
from rillm.server.protocol import (
    IGNORED_CHAT_FIELDS,
    ChatCompletionRequest,
    ChatMessage,
    MediaPart,
    NamedToolChoice,
    Tool,
    ToolCall,
)
from rillm.server.sse import DONE, KEEPALIVE
from rillm.server.streaming import logprob_entries
from rillm.server.templates import TemplateJob, TemplateRejected, rejected

logger = logging.getLogger(__name__)

RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "chat_template", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def template_job(state: Any, engine: ServingEngine, messages: Sequence[ChatMessage],
                 add_generation_prompt: bool, chat_template: str | None,
                 tools: Sequence[Tool] | None = None,
                 template_kwargs: dict[str, Any] | None = None) -> TemplateJob:
    if chat_template is not None and not state.config.trust_request_chat_template:
        raise APIError(400, "a chat_template in the request is refused: a template runs on the "
                       "server, so only one started with --trust-request-chat-template takes "
                       "them", param="chat_template")
    template = chat_template or state.config.chat_template or engine.chat_template
    if not template:
        raise APIError(400, "this model has no chat template; use /v1/completions or start "
                       "the server with --chat-template", param="messages")
    kwargs = template_kwargs or {}
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}",
                       param="chat_template_kwargs")
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if isinstance(part, MediaPart):
                raise APIError(400, f"this server's model reads text only; messages.{i}."
                               f"content.{j} is an {part.type} part",
                               param=f"messages.{i}.content.{j}.type",
                               code="unsupported_content")
    return TemplateJob([_template_message(message) for message in messages], template,
                       add_generation_prompt,
                       [tool.model_dump(exclude_none=True) for tool in tools] if tools else None,
                       kwargs)


async def render_chat(state: Any, engine: ServingEngine, messages: Sequence[ChatMessage],
                      add_generation_prompt: bool, chat_template: str | None,
                      tools: Sequence[Tool] | None = None,
                      template_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt text: a request's own template in the sandbox process (rillm/server/
    templates.py), the server's here — on a worker thread once the messages are long."""
    job = template_job(state, engine, messages, add_generation_prompt, chat_template, tools,
                       template_kwargs)
    if chat_template is not None:
        return await state.templates.render(engine.tokenizer, job)
    try:
        return await off_loop(sum(len(m.text()) for m in messages) > INLINE_CHARS,
                              job.render, engine.tokenizer)
    except TemplateRejected as exc:
        raise rejected(str(exc)) from None


def _template_message(message: ChatMessage) -> dict[str, Any]:
    # The legacy "function" role is a tool's answer.
    role = "tool" if message.role == "function" else message.role
    entry: dict[str, Any] = {"role": role, "content": message.text()}
    if message.name is not None:
        entry["name"] = message.name
    calls = list(message.tool_calls or ())
    if message.function_call is not None:  # the legacy form of one call
        calls.append(ToolCall(id=f"call_{message.function_call.name}",
                              function=message.function_call))
    if calls:
        # Templates format the arguments themselves (often with `| tojson`): give them the
        # object, as Hugging Face templates expect, not OpenAI's JSON string.
        entry["tool_calls"] = [
            {"id": call.id, "type": call.type,
             "function": {"name": call.function.name,
                          "arguments": _json_or_text(call.function.arguments)}}
            for call in calls
        ]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    return entry


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


async def create_chat_completion(state: Any, engine: ServingEngine, body: ChatCompletionRequest,
                                 request: Request) -> Response:
    generation, plan = await prepare_chat(state, engine, body, "chatcmpl-", request)
    if body.stream:
        interval = body.stream_interval or state.config.stream_interval
        options = body.stream_options
        return generation.stream_response(_chat_stream(
            generation, interval, plan,
            include_usage=bool(options and options.include_usage),
            continuous_usage=bool(options and options.continuous_usage_stats),
            logprobs=body.logprobs,
        ))
    final = await run_until_disconnect(request, generation.collect())
    return JSONResponse(_chat_response(generation, final, plan, body.logprobs))


async def parsed_pieces(generation: Generation, plan: ChatOutputPlan, interval: int
                        ) -> AsyncIterator[tuple[StreamPiece, MessageDelta] | None]:
    """A one-choice generation's pieces with what each adds to the message (the reasoning,
    content and tool calls it parses to); None for a keep-alive tick."""
    parser = plan.new_parser() if plan.parses else None
    async for piece in generation.pieces(interval):
        if piece is None:
            yield None
            continue
        if parser is None:
            yield piece, MessageDelta(content=piece.text)
            continue
        delta = parser.feed(piece.text)
        if piece.finish_reason is not None:
            delta = delta.then(parser.finish())
        yield piece, delta


def _spec_fields(body: ChatCompletionRequest) -> ChatCompletionRequest:
    """OpenAI's fields that rillm maps onto its own: `functions` / `function_call` (the
    legacy tools), `reasoning_effort` (the chat template's thinking switch); a 400 for audio
    output; one debug line for the fields accepted and ignored."""
    ignored = [name for name in IGNORED_CHAT_FIELDS if getattr(body, name) is not None]
    if ignored:
        logger.debug("chat request: accepted and ignored: %s", ", ".join(ignored))
    if body.audio is not None or "audio" in (body.modalities or ()):
        raise APIError(400, "this server's model writes text only (no audio output)",
                       param="modalities" if body.audio is None else "audio",
                       code="unsupported_modality")
    update: dict[str, Any] = {}
    if body.functions is not None:
        if body.tools is not None:
            raise APIError(400, "give tools or the legacy functions, not both",
                           param="functions")
        update["tools"] = [Tool(type="function", function=f) for f in body.functions]
    if body.function_call is not None:
        if body.tool_choice is not None:
            raise APIError(400, "give tool_choice or the legacy function_call, not both",
                           param="function_call")
        choice = body.function_call
        update["tool_choice"] = choice if isinstance(choice, str) else NamedToolChoice(
            type="function", function=choice)
    if body.reasoning_effort is not None:
        effort: dict[str, Any] = {"reasoning_effort": body.reasoning_effort}
        if body.reasoning_effort == "none":
            effort["enable_thinking"] = False
        update["chat_template_kwargs"] = {**effort, **(body.chat_template_kwargs or {})}
    return body.model_copy(update=update) if update else body


async def prepare_chat(state: Any, engine: ServingEngine, body: ChatCompletionRequest,
                       id_prefix: str, request: Request,
                       params: Mapping[str, str] | None = None
                       ) -> tuple[Generation, ChatOutputPlan]:
    """A chat request rendered, checked and admitted: its generation (not started) and how
    its output is to be read. The Responses and Messages APIs come through here too, their
    400s naming their own fields (`params`: chat's name -> theirs)."""
    try:
        return await _prepare_chat(state, engine, body, id_prefix, request)
    except APIError as exc:
        exc.param = (params or {}).get(exc.param or "", exc.param)
        raise


async def _prepare_chat(state: Any, engine: ServingEngine, body: ChatCompletionRequest,
                        id_prefix: str, request: Request) -> tuple[Generation, ChatOutputPlan]:
    state.check_model(body.model)
    body = _spec_fields(body)
    kwargs = template_kwargs(state.config, body)
    text = await render_chat(state, engine, body.messages, body.add_generation_prompt,
                             body.chat_template, body.tools, kwargs)
    prompt_ids = await encode(engine.tokenizer, text, add_special_tokens=False)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{param} must be at least 1", param=param)
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}",
                       param="top_logprobs")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    plan, constraint = plan_chat_output(state.config, body, text, kwargs,
                                        structured_outputs(body))
    params = sampling_params(body, max_tokens, logprobs, constraint,
                             state.config.sampling_defaults)
    limits = await admit(engine, [prompt_ids], params,
                         {"prompt": "messages", "max_tokens": param})
    generation = Generation(state, engine, f"{id_prefix}{uuid.uuid4().hex}", body.model
                            or state.model_name, [prompt_ids], params, limits,
                            request.headers.get("x-request-id"))
    return generation, plan


def _chat_response(generation: Generation, final: RequestOutput, plan: ChatOutputPlan,
                   logprobs: bool) -> dict[str, Any]:
    tokenizer = generation.engine.tokenizer
    choices = []
    for choice in final.outputs:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        finish_reason = choice.finish_reason
        if plan.parses:
            parser = plan.new_parser()
            parsed = parse_whole(parser, choice.text)
            calls = [call.to_openai() for call in parser.tool_calls]
            message["content"] = parsed.content if parsed.content or not calls else None
            if plan.reasoning_factory() is not None and plan.include_reasoning:
                for name in plan.reasoning_fields:
                    message[name] = parsed.reasoning or None
            if calls:
                message["tool_calls"] = calls
                finish_reason = tool_finish(finish_reason)
        choices.append({
            "index": choice.index,
            "message": message,
            "logprobs": ({"content": logprob_entries(tokenizer, choice.logprobs or ())}
                         if logprobs else None),
            "finish_reason": finish_reason,
            "stop_reason": choice.stop_reason,
        })
    return {
        "id": generation.response_id,
        "object": "chat.completion",
        "created": generation.created,
        "model": generation.model,
        "choices": choices,
        "usage": generation.usage(final, reasoning_tokens(
            generation, plan, [c.token_ids for c in final.outputs])),
    }


def tool_finish(finish_reason: str | None) -> str | None:
    """A choice that made tool calls and stopped by itself finished to call them."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def reasoning_tokens(generation: Generation, plan: ChatOutputPlan,
                      outputs: Sequence[Sequence[int]]) -> int | None:
    factory = plan.reasoning_factory()
    if factory is None:
        return None
    skip = generation.params.skip_special_tokens
    tokenizer = generation.engine.tokenizer

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=skip))

    return sum(count_reasoning_tokens(ids, decode, factory) for ids in outputs)


def _delta(message: MessageDelta, plan: ChatOutputPlan) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if message.reasoning and plan.include_reasoning:
        for name in plan.reasoning_fields:
            delta[name] = message.reasoning
    if message.content:
        delta["content"] = message.content
    if message.tool_calls:
        delta["tool_calls"] = [call.to_openai() for call in message.tool_calls]
    return delta


async def _chat_stream(generation: Generation, interval: int, plan: ChatOutputPlan, *,
                       include_usage: bool, continuous_usage: bool, logprobs: bool
                       ) -> AsyncIterator[str]:
    tokenizer = generation.engine.tokenizer
    completion_tokens = 0
    obj = "chat.completion.chunk"
    num_choices = generation.params.n
    parsers = [plan.new_parser() for _ in range(num_choices)] if plan.parses else None
    token_ids: list[list[int]] = [[] for _ in range(num_choices)]

    def chunk(choice: dict[str, Any]) -> str:
        return generation.event(obj, [choice], completion_tokens if continuous_usage else None)

    try:
        for index in range(num_choices):
            yield chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None})
        async for piece in generation.pieces(interval):
            if piece is None:
                yield KEEPALIVE
                continue
            completion_tokens = piece.completion_tokens
            token_ids[piece.index] += piece.token_ids
            finish_reason = piece.finish_reason
            if parsers is None:
                delta = {"content": piece.text} if piece.text else {}
            else:
                parser = parsers[piece.index]
                message = parser.feed(piece.text)
                if finish_reason is not None:
                    message = message.then(parser.finish())
                    if parser.tool_calls:
                        finish_reason = tool_finish(finish_reason)
                delta = _delta(message, plan)
            if delta or (logprobs and piece.logprobs):
                yield chunk({
                    "index": piece.index, "delta": delta,
                    "logprobs": ({"content": logprob_entries(tokenizer, piece.logprobs)}
                                 if logprobs else None),
                    "finish_reason": None,
                })
            if finish_reason is not None:
                yield chunk({"index": piece.index, "delta": {}, "logprobs": None,
                             "finish_reason": finish_reason,
                             "stop_reason": piece.stop_reason})
        if include_usage:
            usage = generation.usage_counts(
                completion_tokens, reasoning_tokens(generation, plan, token_ids))
            yield generation.event(obj, [], usage=usage)
    except Exception as exc:  # noqa: BLE001 - after the 200, errors travel in the stream
        yield error_event(exc)
    yield DONE

