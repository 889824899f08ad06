"""POST /v1/responses: OpenAI's Responses API, on the chat path.

A request is translated into a chat request (input items -> messages, function tools -> tools,
`text.format` -> response_format) and goes through `prepare_chat` like any other: the same
template, admission, constrained decoding, reasoning and tool-call parsing. Only the output
differs: typed output items (reasoning, message, function_call) and, streamed, typed events
each with an SSE `event:` line and a strictly increasing `sequence_number`:

    response.created, response.in_progress,
    per item: output_item.added, [content_part.added], deltas, done events, output_item.done,
    response.completed | response.incomplete (max_output_tokens) | response.failed.

rillm keeps no state between requests: `store: true`, `previous_response_id`,
`conversation`, stored `prompt`s and `background` runs are a 400; clients send the whole
input each turn (as Codex and the Agents SDK do with store off).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from rillm.engine.protocol import ServingEngine
from rillm.parsers.message import MessageDelta
from rillm.server.chat import parsed_pieces, prepare_chat, reasoning_tokens
from rillm.server.chat_output import ChatOutputPlan
from rillm.server.errors import APIError
from rillm.server.generation import Generation, run_until_disconnect
from rillm.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionDefinition,
    FunctionName,
    InputMedia,
    InputMessage,
    JsonSchemaFormat,
    NamedToolChoice,
    RefusalPart,
    ResponseFormat,
    ResponsesRequest,
    Tool,
    ToolCall,
)
from rillm.server.protocol import FunctionCall as ChatFunctionCall
from rillm.server.sse import KEEPALIVE, sse

CHAT_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens",
               "response_format": "text.format",
               "response_format.json_schema": "text.format.schema"}
"""The chat path's parameter names as this API calls them, for its 400s."""


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that generates this response; a 400 for what rillm cannot do."""
    stateful = {"store": body.store is True, "previous_response_id": body.previous_response_id,
                "conversation": body.conversation, "prompt": body.prompt,
                "background": body.background is True}
    for param, value in stateful.items():
        if value:
            raise APIError(400, f"rillm keeps no responses between requests, so {param} is not "
                           "supported: send the whole conversation as input (with store "
                           "false or unset)", param=param)
    messages = [ChatMessage(role="system", content=body.instructions)] \
        if body.instructions else []
    if isinstance(body.input, str):
        messages.append(ChatMessage(role="user", content=body.input))
    else:
        for index, item in enumerate(body.input):
            _add_item(messages, item, f"input.{index}")
    if not messages:
        raise APIError(400, "input has no message to answer", param="input")
    extra: dict[str, Any] = {}
    if body.reasoning is not None and body.reasoning.effort is not None:
        # The chat template's thinking switch (Qwen 3's enable_thinking); templates that
        # read an effort get it by name.
        extra = {"reasoning_effort": body.reasoning.effort}
        if body.reasoning.effort == "none":
            extra["enable_thinking"] = False
    fmt = body.text.format if body.text is not None else None
    response_format = None
    if fmt is not None and fmt.type == "json_object":
        response_format = ResponseFormat(type="json_object")
    elif fmt is not None and fmt.type == "json_schema":
        response_format = ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
            name=fmt.name or "response", description=fmt.description, schema=fmt.json_schema,
            strict=fmt.strict))
    choice = body.tool_choice
    return ChatCompletionRequest(
        model=body.model, messages=messages, max_tokens=body.max_output_tokens,
        temperature=body.temperature, top_p=body.top_p, seed=body.seed, top_k=body.top_k,
        min_p=body.min_p, repetition_penalty=body.repetition_penalty,
        ignore_eos=body.ignore_eos, stream=body.stream, stream_interval=body.stream_interval,
        response_format=response_format, structured_outputs=body.structured_outputs,
        chat_template_kwargs={**extra, **(body.chat_template_kwargs or {})} or None,
        tools=[Tool(type="function", function=FunctionDefinition(
            name=t.name, description=t.description, parameters=t.parameters, strict=t.strict))
            for t in body.tools] if body.tools else None,
        tool_choice=(NamedToolChoice(type="function", function=FunctionName(name=choice.name))
                     if choice is not None and not isinstance(choice, str) else choice),
        parallel_tool_calls=body.parallel_tool_calls,
    )


def _add_item(messages: list[ChatMessage], item: Any, where: str) -> None:
    if isinstance(item, InputMessage):
        messages.append(ChatMessage(role=item.role,
                                    content=_text(item.content, f"{where}.content")))
    elif isinstance(item, FunctionCallItem):
        call = ToolCall(id=item.call_id, function=ChatFunctionCall(name=item.name,
                                                                    arguments=item.arguments))
        last = messages[-1] if messages else None
        if last is not None and last.role == "assistant":
            last.tool_calls = [*(last.tool_calls or []), call]  # one turn, several calls
        else:
            messages.append(ChatMessage(role="assistant", tool_calls=[call]))
    elif isinstance(item, FunctionCallOutputItem):
        messages.append(ChatMessage(role="tool", tool_call_id=item.call_id,
                                    content=_text(item.output, f"{where}.output")))
    # Reasoning items: accepted, not rendered (templates show answers, not thinking).


def _text(content: str | list[Any], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        if isinstance(part, InputMedia):
            raise APIError(400, f"this server's model reads text only; {where}.{index} is "
                           f"an {part.type} part", param=f"{where}.{index}.type",
                           code="unsupported_content")
        texts.append(part.refusal if isinstance(part, RefusalPart) else part.text)
    return "".join(texts)


class ResponseBuilder:
    """Output items from a choice's parsed deltas, and the events that build them."""

    def __init__(self, generation: Generation, body: ResponsesRequest) -> None:
        self.generation = generation
        self.body = body
        self.created_at = generation.created
        self.output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text = ""
        self._space = ""  # whitespace not yet in any item: kept for a message that follows

    def feed(self, delta: MessageDelta) -> list[dict[str, Any]]:
        events = []
        if delta.reasoning:
            events += self._append("reasoning", delta.reasoning)
        if delta.content:
            events += self._content(delta.content)
        for call in delta.tool_calls:
            if call.id is not None:
                events += self._close("completed")
                events += self._start({"type": "function_call", "id": _new_id("fc"),
                                       "call_id": call.id, "name": call.name,
                                       "arguments": "", "status": "in_progress"})
            if call.arguments:
                events += self._append("function_call", call.arguments)
        return events

    def finish(self, status: str) -> list[dict[str, Any]]:
        return self._close(status)

    def response(self, status: str, usage: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format if body.text is not None and body.text.format else None
        choice = body.tool_choice
        return {
            "id": self.generation.response_id, "object": "response",
            "created_at": self.created_at, "status": status, "error": error,
            "incomplete_details": ({"reason": "max_output_tokens"}
                                   if status == "incomplete" else None),
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": self.generation.model, "output": list(self.output),
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None,
                          "summary": None},
            "store": False, "temperature": body.temperature,
            "text": {"format": (fmt.model_dump(by_alias=True, exclude_none=True) if fmt
                                else {"type": "text"})},
            "tool_choice": (choice.model_dump() if choice is not None
                            and not isinstance(choice, str) else choice or "auto"),
            "tools": [t.model_dump() for t in body.tools or []],
            "top_p": body.top_p, "truncation": body.truncation or "disabled",
            "usage": usage, "metadata": body.metadata or {}, "user": body.user,
            "background": False,
        }

    def _content(self, text: str) -> list[dict[str, Any]]:
        if self._open is None or self._open["type"] != "message":
            if not text.strip():
                self._space += text  # no message for whitespace between other items
                return []
            text, self._space = self._space + text, ""
        return self._append("message", text)

    def _append(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = []
        if self._open is None or self._open["type"] != kind:
            events += self._close("completed")
            if kind == "reasoning":
                events += self._start({"type": "reasoning", "id": _new_id("rs"), "summary": [],
                                       "content": [], "status": "in_progress"},
                                      {"type": "reasoning_text", "text": ""})
            else:
                events += self._start({"type": "message", "id": _new_id("msg"),
                                       "role": "assistant", "status": "in_progress",
                                       "content": []},
                                      {"type": "output_text", "text": "", "annotations": [],
                                       "logprobs": []})
        self._text += text
        where = self._where()
        if kind == "reasoning":
            events.append({"type": "response.reasoning_text.delta", **where, "delta": text})
        elif kind == "message":
            events.append({"type": "response.output_text.delta", **where, "delta": text,
                           "logprobs": []})
        else:
            events.append({"type": "response.function_call_arguments.delta",
                           "item_id": where["item_id"], "output_index": where["output_index"],
                           "delta": text})
        return events

    def _start(self, item: dict[str, Any], part: dict[str, Any] | None = None
               ) -> list[dict[str, Any]]:
        self._open = item
        self._text = ""
        self.output.append(item)
        events = [{"type": "response.output_item.added", "output_index": len(self.output) - 1,
                   "item": _copy(item)}]
        if part is not None:
            events.append({"type": "response.content_part.added", **self._where(),
                           "part": part})
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        item = self._open
        if item is None:
            return []
        where, text = self._where(), self._text
        self._open, self._text = None, ""
        item["status"] = status
        if item["type"] == "function_call":
            item["arguments"] = text
            return [{"type": "response.function_call_arguments.done",
                     "item_id": item["id"], "output_index": where["output_index"],
                     "arguments": text},
                    {"type": "response.output_item.done", "output_index": where["output_index"],
                     "item": _copy(item)}]
        part: dict[str, Any]
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            done = {"type": "response.reasoning_text.done", **where, "text": text}
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            done = {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
        item["content"] = [part]
        return [done, {"type": "response.content_part.done", **where, "part": part},
                {"type": "response.output_item.done", "output_index": where["output_index"],
                 "item": _copy(item)}]

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self.output) - 1,
                "content_index": 0}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))


def _usage(generation: Generation, plan: ChatOutputPlan, output_ids: list[int]
           ) -> dict[str, Any]:
    thought = reasoning_tokens(generation, plan, [output_ids]) or 0
    prompt = generation.num_prompt_tokens
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": generation.num_cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": len(output_ids),
            "output_tokens_details": {"reasoning_tokens": thought},
            "total_tokens": prompt + len(output_ids)}


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


async def create_response(state: Any, engine: ServingEngine, body: ResponsesRequest,
                          request: Request) -> Response:
    generation, plan = await prepare_chat(state, engine, chat_request(body), "resp_",
                                          request, CHAT_PARAMS)
    builder = ResponseBuilder(generation, body)
    if body.stream:
        interval = body.stream_interval or state.config.stream_interval
        return generation.stream_response(_stream(generation, plan, builder, interval))
    final = await run_until_disconnect(request, generation.collect())
    choice = final.outputs[0]
    builder.feed(plan.whole(choice.text))
    status = _status(choice.finish_reason)
    builder.finish(status)
    return JSONResponse(builder.response(status, _usage(generation, plan,
                                                        list(choice.token_ids))))


async def _stream(generation: Generation, plan: ChatOutputPlan, builder: ResponseBuilder,
                  interval: int) -> AsyncIterator[str]:
    sequence = 0

    def event(data: dict[str, Any]) -> str:
        nonlocal sequence
        data = {**data, "sequence_number": sequence}
        sequence += 1
        return sse(data, event=data["type"])

    started = builder.response("in_progress")
    yield event({"type": "response.created", "response": started})
    yield event({"type": "response.in_progress", "response": started})
    token_ids: list[int] = []
    try:
        async for parsed in parsed_pieces(generation, plan, interval):
            if parsed is None:
                yield KEEPALIVE
                continue
            piece, delta = parsed
            token_ids += piece.token_ids
            for data in builder.feed(delta):
                yield event(data)
            if piece.finish_reason is not None:
                status = _status(piece.finish_reason)
                for data in builder.finish(status):
                    yield event(data)
                yield event({"type": f"response.{status}", "response": builder.response(
                    status, _usage(generation, plan, token_ids))})
    except Exception as exc:  # noqa: BLE001 - after the 200, errors travel in the stream
        for data in builder.finish("incomplete"):
            yield event(data)
        message = exc.message if isinstance(exc, APIError) else f"generation failed: {exc}"
        yield event({"type": "response.failed", "response": builder.response(
            "failed", error={"code": "server_error", "message": message})})
