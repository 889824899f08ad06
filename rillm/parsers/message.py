"""One chat choice's output text -> reasoning, content and tool calls.

The reasoning parser runs first; the tool-call parser reads only what it leaves as content,
so calls after a thinking block are found like any others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rillm.parsers.reasoning import ReasoningDelta, ReasoningParser
from rillm.parsers.tool_calls import ToolCall, ToolCallDelta, ToolCallParser, ToolParse


@dataclass(frozen=True)
class MessageDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def then(self, later: MessageDelta) -> MessageDelta:
        """This delta followed by `later`, as one."""
        return MessageDelta(self.reasoning + later.reasoning, self.content + later.content,
                            self.tool_calls + later.tool_calls)


class MessageParser:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def feed(self, text: str) -> MessageDelta:
        if self.reasoning is None:
            return self._tools(ReasoningDelta(content=text), final=False)
        return self._tools(self.reasoning.feed(text), final=False)

    def finish(self) -> MessageDelta:
        """The end of the output: everything held back comes out."""
        tail = self.reasoning.flush() if self.reasoning is not None else ReasoningDelta()
        return self._tools(tail, final=True)

    def _tools(self, delta: ReasoningDelta, final: bool) -> MessageDelta:
        if self.tools is None:
            return MessageDelta(delta.reasoning, delta.content)
        parsed = self.tools.feed(delta.content) if delta.content else ToolParse()
        content, calls = parsed.content, parsed.calls
        if final:
            rest = self.tools.flush()
            content, calls = content + rest.content, calls + rest.calls
        return MessageDelta(delta.reasoning, content, calls)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools is not None else []


def parse_whole(parser: MessageParser, text: str) -> MessageDelta:
    """A whole output at once (non-streaming): the same split as streaming it."""
    return parser.feed(text).then(parser.finish())


def count_reasoning_tokens(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str],
                           new_parser: Callable[[], ReasoningParser]) -> int:
    """Output tokens up to and including the one that ends the thinking block (all of them if
    it never ends, none if the output never thought). The same for a stream and a whole
    response: it looks at the tokens, not at how they were grouped in events."""

    def parsed(num_tokens: int) -> ReasoningParser:
        parser = new_parser()
        parser.feed(decode(token_ids[:num_tokens]))
        return parser

    whole = parsed(len(token_ids))
    if not whole.ended_reasoning:
        return len(token_ids) if whole.thought else 0
    low, high = 1, len(token_ids)  # the smallest prefix that ends the thinking block
    while low < high:
        middle = (low + high) // 2
        if parsed(middle).ended_reasoning:
            high = middle
        else:
            low = middle + 1
    return low
