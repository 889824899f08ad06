"""What a chat request's output is made of, decided before generation: which reasoning parser
reads it, how tool calls are found (parsed from the model's own format for tool_choice "auto",
or forced by constrained decoding for "required" and a named function), and the decoding
constraint that follows from tool_choice or response_format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from rillm.parsers.message import MessageDelta, MessageParser, parse_whole
from rillm.parsers.reasoning import ReasoningParser, make_reasoning_parser
from rillm.parsers.tool_calls import make_tool_parser
from rillm.sampling_params import InvalidParameterError
from rillm.server.config import REASONING_FIELDS, ServerConfig
from rillm.server.errors import APIError
from rillm.server.protocol import ChatCompletionRequest, NamedToolChoice, TokenizeRequest, Tool
from rillm.structured_outputs import StructuredOutputsParams


@dataclass(frozen=True)
class ChatOutputPlan:
    reasoning_parser: str | None = None
    prompt_text: str = ""
    template_kwargs: dict[str, Any] | None = None
    tool_parser: str | None = None
    """hermes / llama3_json (auto), json_array (required), named; None: no tool calls."""
    function: str | None = None
    """The function a named tool_choice forces."""
    parallel_tool_calls: bool = True
    include_reasoning: bool = True
    reasoning_fields: tuple[str, ...] = ("reasoning",)
    """The message / delta fields the thinking goes in (--reasoning-field)."""

    @property
    def parses(self) -> bool:
        """Does the output need parsing at all (otherwise every delta is plain content)?"""
        return self.reasoning_parser is not None or self.tool_parser is not None

    def reasoning_factory(self) -> Callable[[], ReasoningParser] | None:
        """Fresh reasoning parsers for this output's choices; None: no reasoning parsing."""
        name = self.reasoning_parser
        if name is None:
            return None

        def factory() -> ReasoningParser:
            parser = make_reasoning_parser(name, self.prompt_text, self.template_kwargs or {})
            assert parser is not None  # plan_chat_output keeps only parsers that apply
            return parser

        return factory

    def whole(self, text: str) -> MessageDelta:
        """A whole output split as streaming it would split it."""
        return parse_whole(self.new_parser(), text) if self.parses else MessageDelta(content=text)

    def new_parser(self) -> MessageParser:
        factory = self.reasoning_factory()
        tools = (make_tool_parser(self.tool_parser, self.parallel_tool_calls, self.function)
                 if self.tool_parser is not None else None)
        return MessageParser(factory() if factory is not None else None, tools)


def template_kwargs(config: ServerConfig, body: ChatCompletionRequest | TokenizeRequest
                    ) -> dict[str, Any]:
    """The request's chat_template_kwargs over the server's defaults."""
    return {**config.default_chat_template_kwargs, **(body.chat_template_kwargs or {})}


def plan_chat_output(config: ServerConfig, body: ChatCompletionRequest, prompt_text: str,
                     kwargs: dict[str, Any], response_constraint: StructuredOutputsParams | None,
                     ) -> tuple[ChatOutputPlan, StructuredOutputsParams | None]:
    """The plan and the decoding constraint; a 400 for tool settings that cannot work."""
    choice = _tool_choice(config, body)
    parallel = body.parallel_tool_calls is not False
    tools = body.tools or []
    reasoning = config.reasoning_parser
    if reasoning is not None and make_reasoning_parser(reasoning, prompt_text, kwargs) is None:
        reasoning = None  # this output cannot think (qwen3 with enable_thinking false)
    plan = ChatOutputPlan(reasoning, prompt_text, kwargs,
                          parallel_tool_calls=parallel, include_reasoning=body.include_reasoning,
                          reasoning_fields=REASONING_FIELDS[config.reasoning_field])
    if choice == "none":
        return plan, response_constraint
    if choice == "auto":
        return replace(plan, tool_parser=config.tool_call_parser), response_constraint
    if response_constraint is not None:
        raise APIError(400, "response_format / structured_outputs cannot be combined with a "
                       "tool_choice that forces a call", param="tool_choice")
    # A forced call is constrained from the first token: no thinking block before it.
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        constraint = _constraint(json=_parameters(tool))
        return replace(plan, reasoning_parser=None, tool_parser="named",
                        function=tool.function.name), constraint
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object",
         "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
         "required": ["name", "parameters"], "additionalProperties": False}
        for t in tools
    ]}}
    if not parallel:
        calls["maxItems"] = 1
    return replace(plan, reasoning_parser=None, tool_parser="json_array"), _constraint(
        json=calls)


def _tool_choice(config: ServerConfig, body: ChatCompletionRequest) -> str | NamedToolChoice:
    tools = body.tools or []
    choice = body.tool_choice
    if choice is None:
        return "auto" if tools and config.enable_auto_tool_choice else "none"
    if choice == "none":
        return choice
    if not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        if not any(t.function.name == choice.function.name for t in tools):
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not "
                           "among the tools", param="tool_choice")
        return choice
    if choice == "auto" and not config.enable_auto_tool_choice:
        raise APIError(400, 'tool_choice "auto" needs the server started with '
                       "--enable-auto-tool-choice and --tool-call-parser", param="tool_choice")
    return choice


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _constraint(**spec: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**spec, param="tools")
    except InvalidParameterError as exc:
        raise APIError.from_invalid(exc) from None
