"""POST /v1/messages (and /v1/messages/count_tokens): Anthropic's Messages API, on the chat path.

As with the Responses API, a request becomes a chat request (content blocks -> messages,
`tool_use` / `tool_result` -> tool calls and tool messages, `thinking` -> the chat template's
thinking switch) and runs through `prepare_chat`; the output is content blocks (`thinking`,
`text`, `tool_use`) and, streamed, Anthropic's events:

    message_start, ping, per block: content_block_start, content_block_delta (text_delta,
    thinking_delta, input_json_delta)..., content_block_stop; message_delta (stop_reason,
    usage), message_stop.

Errors on these routes are in Anthropic's shape (rillm/server/errors.py), and the API key is
also accepted as `x-api-key` (rillm/server/gate.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from rillm.engine.protocol import ServingEngine
from rillm.parsers.message import MessageDelta
from rillm.server.chat import parsed_pieces, prepare_chat, render_chat
from rillm.server.chat_output import ChatOutputPlan, template_kwargs
from rillm.server.errors import APIError
from rillm.server.generation import Generation, run_until_disconnect
from rillm.server.offload import encode
from rillm.server.protocol import (
    AnthropicMedia,
    AnthropicMessage,
    AnthropicText,
    AnthropicToolResult,
    AnthropicToolUse,
    ChatCompletionRequest,
    ChatMessage,
    CountTokensRequest,
    FunctionCall,
    FunctionDefinition,
    FunctionName,
    MessagesRequest,
    NamedToolChoice,
    Tool,
    ToolCall,
)
from rillm.server.sse import sse

CHAT_PARAMS = {"stop": "stop_sequences"}
"""The chat path's parameter names as this API calls them, for its 400s."""
PING = sse({"type": "ping"}, event="ping")


def chat_request(body: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that generates this message; a 400 for what a text model cannot do."""
    messages: list[ChatMessage] = []
    if body.system:
        system = body.system if isinstance(body.system, str) \
            else "".join(block.text for block in body.system)
        messages.append(ChatMessage(role="system", content=system))
    for index, message in enumerate(body.messages):
        _add_message(messages, message, f"messages.{index}.content")
    if not messages:
        raise APIError(400, "messages hold nothing to answer (thinking blocks alone are not "
                       "rendered)", param="messages")
    choice = body.tool_choice
    thinking = body.thinking
    kwargs = {"enable_thinking": thinking.type != "disabled"} if thinking is not None else {}
    common: dict[str, Any] = dict(
        model=body.model, messages=messages, chat_template_kwargs=kwargs or None,
        tools=[Tool(type="function", function=FunctionDefinition(
            name=t.name, description=t.description, parameters=t.input_schema, strict=t.strict))
            for t in body.tools] if body.tools else None,
        tool_choice=_tool_choice(choice) if choice is not None else None,
        parallel_tool_calls=(False if choice is not None and choice.disable_parallel_tool_use
                             else None))
    if isinstance(body, CountTokensRequest):
        return ChatCompletionRequest(**common)
    if body.chat_template_kwargs:
        common["chat_template_kwargs"] = {**kwargs, **body.chat_template_kwargs}
    return ChatCompletionRequest(
        **common, max_tokens=body.max_tokens, stop=body.stop_sequences,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
        min_p=body.min_p, repetition_penalty=body.repetition_penalty,
        ignore_eos=body.ignore_eos, stream=body.stream, stream_interval=body.stream_interval,
        structured_outputs=body.structured_outputs)


def _tool_choice(choice: Any) -> Any:
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, 'tool_choice of type "tool" needs a name', param="tool_choice")
        return NamedToolChoice(type="function", function=FunctionName(name=choice.name))
    return {"any": "required"}.get(choice.type, choice.type)


def _add_message(messages: list[ChatMessage], message: AnthropicMessage, where: str) -> None:
    if isinstance(message.content, str):
        messages.append(ChatMessage(role=message.role, content=message.content))
        return
    text: list[str] = []
    calls: list[ToolCall] = []
    for index, block in enumerate(message.content):
        if isinstance(block, AnthropicMedia):
            raise APIError(400, f"this server's model reads text only; {where}.{index} is "
                           f"a {block.type} block", param=f"{where}.{index}.type")
        if isinstance(block, AnthropicText):
            text.append(block.text)
        elif isinstance(block, AnthropicToolUse):
            calls.append(ToolCall(id=block.id, function=FunctionCall(
                name=block.name, arguments=json.dumps(block.input, ensure_ascii=False))))
        elif isinstance(block, AnthropicToolResult):
            # A user turn's tool results answer the calls before it: tool messages first.
            messages.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id,
                                        content=_result_text(block, f"{where}.{index}")))
        # Thinking blocks sent back: accepted, not rendered.
    if text or calls:
        messages.append(ChatMessage(role=message.role, content="".join(text) or None,
                                    tool_calls=calls or None))


def _result_text(block: AnthropicToolResult, where: str) -> str:
    if block.content is None or isinstance(block.content, str):
        return block.content or ""
    for index, part in enumerate(block.content):
        if isinstance(part, AnthropicMedia):
            raise APIError(400, f"this server's model reads text only; {where}.content.{index} "
                           f"is a {part.type} block", param=f"{where}.content.{index}.type")
    return "".join(part.text for part in block.content if isinstance(part, AnthropicText))


class MessageBuilder:
    """Content blocks from a choice's parsed deltas, and the events that build them."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text = ""
        self._space = ""  # whitespace between blocks, kept for a text block that follows

    def feed(self, delta: MessageDelta) -> list[dict[str, Any]]:
        events = []
        if delta.reasoning:
            events += self._append("thinking", delta.reasoning)
        if delta.content:
            if self._open is None or self._open["type"] != "text":
                if not delta.content.strip():
                    self._space += delta.content
                else:
                    events += self._append("text", self._space + delta.content)
                    self._space = ""
            else:
                events += self._append("text", delta.content)
        for call in delta.tool_calls:
            if call.id is not None:
                events += self._close()
                events += self._start({"type": "tool_use", "id": call.id, "name": call.name,
                                       "input": {}})
            if call.arguments:
                events += self._append("tool_use", call.arguments)
        return events

    def finish(self) -> list[dict[str, Any]]:
        return self._close()

    @property
    def used_tools(self) -> bool:
        return any(block["type"] == "tool_use" for block in self.content)

    def _append(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = []
        if self._open is None or self._open["type"] != kind:
            events += self._close()
            events += self._start({"type": "thinking", "thinking": "", "signature": ""}
                                  if kind == "thinking" else {"type": "text", "text": ""})
        self._text += text
        delta = {"thinking": {"type": "thinking_delta", "thinking": text},
                 "text": {"type": "text_delta", "text": text},
                 "tool_use": {"type": "input_json_delta", "partial_json": text}}[kind]
        events.append({"type": "content_block_delta", "index": len(self.content) - 1,
                       "delta": delta})
        return events

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        self._open, self._text = block, ""
        self.content.append(block)
        return [{"type": "content_block_start", "index": len(self.content) - 1,
                 "content_block": dict(block)}]

    def _close(self) -> list[dict[str, Any]]:
        block = self._open
        if block is None:
            return []
        self._open = None
        if block["type"] == "tool_use":
            try:
                arguments = json.loads(self._text or "{}")
            except ValueError:
                arguments = None
            block["input"] = arguments if isinstance(arguments, dict) else {}
        else:
            block[block["type"]] = self._text
        return [{"type": "content_block_stop", "index": len(self.content) - 1}]


def _stop(finish_reason: str | None, stop_reason: str | int | None, used_tools: bool
          ) -> tuple[str | None, str | None]:
    """Anthropic's stop_reason and stop_sequence for the engine's finish."""
    if finish_reason == "length":
        return "max_tokens", None
    if used_tools:
        return "tool_use", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _usage(generation: Generation, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": generation.num_prompt_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": generation.num_cached_tokens,
            "cache_creation_input_tokens": 0}


def _message(generation: Generation, content: list[dict[str, Any]], stop: str | None,
             sequence: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": generation.response_id, "type": "message", "role": "assistant",
            "model": generation.model, "content": content, "stop_reason": stop,
            "stop_sequence": sequence, "usage": usage}


async def create_message(state: Any, engine: ServingEngine, body: MessagesRequest,
                         request: Request) -> Response:
    generation, plan = await prepare_chat(state, engine, chat_request(body), "msg_",
                                          request, CHAT_PARAMS)
    builder = MessageBuilder()
    if body.stream:
        interval = body.stream_interval or state.config.stream_interval
        return generation.stream_response(_stream(generation, plan, builder, interval))
    final = await run_until_disconnect(request, generation.collect())
    choice = final.outputs[0]
    builder.feed(plan.whole(choice.text))
    builder.finish()
    stop, sequence = _stop(choice.finish_reason, choice.stop_reason, builder.used_tools)
    return JSONResponse(_message(generation, builder.content, stop, sequence,
                                 _usage(generation, len(choice.token_ids))))


async def _stream(generation: Generation, plan: ChatOutputPlan, builder: MessageBuilder,
                  interval: int) -> AsyncIterator[str]:
    def event(data: dict[str, Any]) -> str:
        return sse(data, event=data["type"])

    yield event({"type": "message_start", "message": _message(
        generation, [], None, None, _usage(generation, 0))})
    yield PING
    try:
        async for parsed in parsed_pieces(generation, plan, interval):
            if parsed is None:
                yield PING
                continue
            piece, delta = parsed
            for data in builder.feed(delta):
                yield event(data)
            if piece.finish_reason is not None:
                for data in builder.finish():
                    yield event(data)
                stop, sequence = _stop(piece.finish_reason, piece.stop_reason,
                                       builder.used_tools)
                yield event({"type": "message_delta",
                             "delta": {"stop_reason": stop, "stop_sequence": sequence},
                             "usage": {"output_tokens": piece.completion_tokens}})
                yield event({"type": "message_stop"})
    except Exception as exc:  # noqa: BLE001 - after the 200, errors travel in the stream
        message = exc.message if isinstance(exc, APIError) else f"generation failed: {exc}"
        yield event({"type": "error", "error": {"type": "api_error", "message": message}})


async def count_tokens(state: Any, engine: ServingEngine, body: CountTokensRequest
                       ) -> dict[str, int]:
    """The prompt's length as /v1/messages would render it."""
    state.check_model(body.model)
    chat = chat_request(body)
    text = await render_chat(state, engine, chat.messages, True, None, chat.tools,
                             template_kwargs(state.config, chat))
    return {"input_tokens": len(await encode(engine.tokenizer, text,
                                             add_special_tokens=False))}
