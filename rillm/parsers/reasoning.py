"""Reasoning parsers: split a model's output text into its thinking and its answer.

They work on text, not tokens, and hold back only what could still turn into a tag, so a tag
split across tokens or several tokens arriving in one event are the same to them: feeding the
text in any pieces gives the same reasoning and content as feeding it whole.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

START_TAG = "<think>"
END_TAG = "</think>"


class Phase(enum.Enum):
    UNDECIDED = "undecided"
    """Not yet known whether the output opens with a thinking block (qwen3)."""
    REASONING = "reasoning"
    CONTENT = "content"


@dataclass(frozen=True)
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """`<think>…</think>` then the answer.

    `thinking_first`: the output starts inside the thinking block (DeepSeek-R1 style, or a
    prompt that already opened `<think>`); an opening tag at the very start is then dropped.
    Otherwise the output thinks only if it opens with `<think>` (Qwen3 style). Whitespace
    right after `</think>` is dropped; everything after the first `</think>` is content.
    """

    def __init__(self, thinking_first: bool) -> None:
        self.phase = Phase.REASONING if thinking_first else Phase.UNDECIDED
        self.thought = False
        """A thinking block was opened (or the output started in one)."""
        self._may_open = True
        """The opening tag may still come (only at the very start)."""
        self._strip_content = False
        self._pending = ""

    @property
    def ended_reasoning(self) -> bool:
        return self.thought and self.phase is Phase.CONTENT

    def feed(self, text: str) -> ReasoningDelta:
        self._pending += text
        reasoning, content = [], []
        while self._pending:
            if self._may_open:
                stripped = self._pending.lstrip()
                if START_TAG.startswith(stripped):
                    break  # could still be the opening tag
                self._may_open = False
                if stripped.startswith(START_TAG):
                    self._pending = stripped[len(START_TAG):]
                    self.phase = Phase.REASONING
                elif self.phase is Phase.UNDECIDED:
                    self.phase = Phase.CONTENT
                if self.phase is Phase.REASONING:
                    self.thought = True
                continue
            if self.phase is Phase.CONTENT:
                if self._strip_content:
                    self._pending = self._pending.lstrip()
                    if not self._pending:
                        break
                    self._strip_content = False
                content.append(self._pending)
                self._pending = ""
                break
            end = self._pending.find(END_TAG)
            if end >= 0:
                reasoning.append(self._pending[:end])
                self._pending = self._pending[end + len(END_TAG):]
                self.phase = Phase.CONTENT
                self._strip_content = True
                continue
            keep = partial_suffix(self._pending, END_TAG)
            reasoning.append(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            break
        return ReasoningDelta("".join(reasoning), "".join(content))

    def flush(self) -> ReasoningDelta:
        """The end of the output: whatever was held back goes where it stands."""
        pending, self._pending = self._pending, ""
        if self.phase is Phase.REASONING:
            return ReasoningDelta(reasoning=pending)
        if self._strip_content:
            pending = pending.lstrip()
        return ReasoningDelta(content=pending)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


REASONING_PARSERS = ("deepseek_r1", "qwen3")


def make_reasoning_parser(name: str, prompt_text: str,
                          chat_template_kwargs: dict[str, object]) -> ReasoningParser | None:
    """The parser for one output; None when this output cannot think (qwen3 with
    `enable_thinking: false`)."""
    opened = prompt_text.rstrip().endswith(START_TAG)
    if name == "deepseek_r1":
        return ReasoningParser(thinking_first=True)
    if name == "qwen3":
        if chat_template_kwargs.get("enable_thinking") is False:
            return None
        return ReasoningParser(thinking_first=opened)
    raise ValueError(f"unknown reasoning parser {name!r}; choose from {REASONING_PARSERS}")
