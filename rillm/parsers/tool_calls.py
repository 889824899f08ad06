"""Tool-call parsers: find function calls in a model's output text as it streams.

Each parser takes text in any pieces and returns plain content plus `ToolCallDelta`s in
OpenAI's streaming shape: a call's first delta carries its index, id and name; later deltas
append to its arguments. The arguments are streamed as the model writes them (the raw JSON
text of the arguments object), so their concatenation is exactly the model's JSON.

Formats:
- `hermes`: `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks between content.
- `llama3_json`: an output that opens with `{` (optionally after `<|python_tag|>`) is one or
  more `{"name": …, "parameters": {…}}` objects separated by `;`.
- `json_array` (tool_choice "required", decoding constrained to the tools' schemas):
  `[{"name": …, "parameters": {…}}, …]`.
- `named` (tool_choice naming one function, decoding constrained to its parameters): the whole
  output is that function's arguments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from rillm.parsers.reasoning import partial_suffix

ARGUMENT_KEYS = ("arguments", "parameters")
TOOL_CALL_PARSERS = ("hermes", "llama3_json")


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    """Set (with `name`) on a call's first delta only."""
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, object]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def to_openai(self) -> dict[str, object]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolParse:
    content: str = ""
    calls: tuple[ToolCallDelta, ...] = ()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _Value:
    """Follows one JSON value char by char: knows when it ends without parsing it."""

    def __init__(self) -> None:
        self.text = ""
        self.kind = ""  # "container", "string" or "scalar" once started
        self.done = False
        self._depth = 0
        self._in_string = False
        self._escape = False

    def feed(self, char: str) -> bool:
        """Take one char; False if it is not part of the value (it ends a scalar)."""
        if not self.kind:
            if char.isspace():
                return True
            self.kind = "container" if char in "{[" else "string" if char == '"' else "scalar"
            self._depth = 1 if self.kind == "container" else 0
            self._in_string = self.kind == "string"
            self.text = char
            return True
        if self.kind == "scalar":
            if char in ",}]" or char.isspace():
                self.done = True
                return False
            self.text += char
            return True
        self.text += char
        if self._in_string:
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
            elif char == '"':
                self._in_string = False
                if self.kind == "string":
                    self.done = True
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            if self._depth == 0:
                self.done = True
        return True


class _CallObject:
    """One `{"name": …, "arguments": …}` object read char by char, streaming the arguments'
    text as it comes once the name is known."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.call_id = new_call_id()
        self.name: str | None = None
        self.arguments = ""
        self.done = False
        self.failed = False
        self._stage = "open"  # open, key, colon, value, next, done
        self._key = _Value()
        self._value: _Value | None = None
        self._value_key = ""
        self.announced = False
        self._held_arguments = ""
        self._saw_arguments = False

    def feed(self, char: str, out: list[ToolCallDelta]) -> bool:
        """Take one char; False once the object is complete or broken (char not taken)."""
        if self.done or self.failed:
            return False
        if self._stage == "value":
            assert self._value is not None
            taken = self._value.feed(char)
            if taken and self._value.kind == "container" and self._value_key in ARGUMENT_KEYS:
                self._stream_arguments(char, out)
            if self._value.done:
                self._end_value(out)
            if taken:
                return True
        if self._stage == "key" and self._key.kind:  # inside the key's string
            self._key.feed(char)
            if self._key.done:
                self._stage = "colon"
            return True
        if char.isspace():
            return True
        stage = self._stage
        if stage == "open" and char == "{":
            self._stage = "key"
        elif stage == "key" and char == "}":
            return self._finish(out)
        elif stage == "key" and char == '"':
            self._key.feed(char)
        elif stage == "colon" and char == ":":
            self._start_value()
        elif stage == "next" and char == ",":
            self._key = _Value()
            self._stage = "key"
        elif stage == "next" and char == "}":
            return self._finish(out)
        else:
            return self._fail()
        return True

    def _start_value(self) -> None:
        try:
            self._value_key = json.loads(self._key.text)
        except ValueError:
            self._value_key = ""
        self._value = _Value()
        self._stage = "value"

    def _stream_arguments(self, char: str, out: list[ToolCallDelta]) -> None:
        self._saw_arguments = True
        if self.announced:
            self.arguments += char
            out.append(ToolCallDelta(self.index, arguments=char))
        else:
            self._held_arguments += char

    def _end_value(self, out: list[ToolCallDelta]) -> None:
        assert self._value is not None
        value, key = self._value, self._value_key
        if key == "name" and value.kind == "string":
            self.name = json.loads(value.text)
            self.announce(out)
        elif key in ARGUMENT_KEYS and value.kind != "container":
            # Arguments written as a JSON string (or null): decode them whole.
            self._saw_arguments = True
            decoded = json.loads(value.text) if value.kind == "string" else None
            text = decoded if isinstance(decoded, str) else "{}"
            if self.announced:
                self.arguments += text
                out.append(ToolCallDelta(self.index, arguments=text))
            else:
                self._held_arguments = text
        self._value = None
        self._stage = "next"

    def announce(self, out: list[ToolCallDelta]) -> None:
        """The call's first delta (id and name), then any arguments read before the name."""
        self.announced = True
        out.append(ToolCallDelta(self.index, self.call_id, self.name, ""))
        if self._held_arguments:
            self.arguments += self._held_arguments
            out.append(ToolCallDelta(self.index, arguments=self._held_arguments))
            self._held_arguments = ""

    def _finish(self, out: list[ToolCallDelta]) -> bool:
        if self.name is None:
            return self._fail()
        if not self._saw_arguments:
            self.arguments = "{}"
            out.append(ToolCallDelta(self.index, arguments="{}"))
        self.done = True
        self._stage = "done"
        return True

    def _fail(self) -> bool:
        self.failed = True
        return False

    def call(self) -> ToolCall:
        return ToolCall(self.call_id, self.name or "", self.arguments)


class ToolCallParser:
    """Base: content and calls streamed out of text fed in any pieces."""

    def __init__(self, parallel: bool = True) -> None:
        self.parallel = parallel
        self.calls: list[ToolCall] = []
        """Complete calls so far (only the first when not `parallel`)."""
        self._current: _CallObject | None = None
        self._num_seen = 0

    def feed(self, text: str) -> ToolParse:
        raise NotImplementedError

    def flush(self) -> ToolParse:
        return ToolParse()

    def _feed_object(self, char: str, out: list[ToolCallDelta]) -> bool:
        """Feed the call being read; True if the char was taken by it."""
        if self._current is None:
            self._current = _CallObject(self._num_seen)
            self._num_seen += 1
        deltas: list[ToolCallDelta] = []
        taken = self._current.feed(char, deltas)
        kept = self.parallel or self._current.index == 0
        if kept:
            out.extend(deltas)
        if self._current.done:
            if kept:
                self.calls.append(self._current.call())
            self._current = None
        return taken


class HermesToolParser(ToolCallParser):
    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    def __init__(self, parallel: bool = True) -> None:
        super().__init__(parallel)
        self._pending = ""
        self._inside = False
        self._block = ""
        """The raw text of the block being read (content again if it is not a call)."""
        self._block_done = False
        """The block's call is complete (or broken): the rest of the block is ignored."""

    def feed(self, text: str) -> ToolParse:
        self._pending += text
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        while self._pending:
            if not self._inside:
                start = self._pending.find(self.OPEN)
                if start < 0:
                    keep = partial_suffix(self._pending, self.OPEN)
                    content.append(self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                content.append(self._pending[:start])
                self._pending = self._pending[start + len(self.OPEN):]
                self._inside, self._block, self._current = True, "", None
                self._block_done = False
                continue
            end = self._pending.find(self.CLOSE)
            body = self._pending if end < 0 else self._pending[:end]
            if end < 0:
                keep = partial_suffix(body, self.CLOSE)
                body = body[: len(body) - keep]
            for char in body:
                self._block += char
                if not self._block_done:
                    self._feed_object(char, calls)
                    self._block_done = self._current is None or self._current.failed
            if end < 0:
                self._pending = self._pending[len(body):]
                break
            self._pending = self._pending[end + len(self.CLOSE):]
            self._inside = False
            if self._current is not None:  # never completed: give the text back as content
                if self._current.name is None:
                    content.append(self.OPEN + self._block + self.CLOSE)
                self._current = None
        return ToolParse("".join(content), _coalesce(calls))

    def flush(self) -> ToolParse:
        pending, self._pending = self._pending, ""
        if self._inside and (self._current is not None and self._current.name is None):
            return ToolParse(self.OPEN + self._block + pending)
        return ToolParse("" if self._inside else pending)


class JsonToolParser(ToolCallParser):
    """Calls written as bare JSON objects: llama3_json (when the output opens with `{`), the
    constrained `json_array`, or `named` (the output is one call's arguments)."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, mode: str, parallel: bool = True, name: str | None = None) -> None:
        super().__init__(parallel)
        self.mode = mode
        self._decided = mode != "llama3_json"
        self._is_calls = mode != "llama3_json"
        self._pending = ""
        self._named: _CallObject | None = None
        if mode == "named":
            assert name is not None
            self._named = _CallObject(0)
            self._named.name = name

    def feed(self, text: str) -> ToolParse:
        if not self._decided:
            self._pending += text
            stripped = self._pending.lstrip()
            if stripped.startswith(self.PYTHON_TAG):
                stripped = stripped[len(self.PYTHON_TAG):].lstrip()
            if not stripped or self.PYTHON_TAG.startswith(stripped):
                return ToolParse()
            self._decided = True
            self._is_calls = stripped.startswith("{")
            text, self._pending = (stripped if self._is_calls else self._pending), ""
        if not self._is_calls:
            return ToolParse(content=text)
        calls: list[ToolCallDelta] = []
        if self._named is not None:
            if not self._named.announced:
                self._named.announce(calls)
            self._named.arguments += text
            if text:
                calls.append(ToolCallDelta(0, arguments=text))
            return ToolParse(calls=tuple(calls))
        for char in text:
            if self._current is not None:
                if self._feed_object(char, calls):
                    continue
            if char.isspace() or char in "[],;":
                continue
            self._feed_object(char, calls)
        return ToolParse(calls=_coalesce(calls))

    def flush(self) -> ToolParse:
        if self._named is not None:
            if self._named.announced:
                self.calls = [self._named.call()]
            return ToolParse()
        if not self._decided:
            pending, self._pending = self._pending, ""
            return ToolParse(content=pending)
        return ToolParse()


def _coalesce(deltas: list[ToolCallDelta]) -> tuple[ToolCallDelta, ...]:
    """Join consecutive argument pieces of the same call into one delta."""
    merged: list[ToolCallDelta] = []
    for delta in deltas:
        last = merged[-1] if merged else None
        if (last is not None and delta.id is None and last.index == delta.index
                and last.id is None):
            merged[-1] = ToolCallDelta(last.index, last.id, last.name,
                                       last.arguments + delta.arguments)
        else:
            merged.append(delta)
    return tuple(merged)


def make_tool_parser(name: str, parallel: bool = True,
                     function: str | None = None) -> ToolCallParser:
    if name == "hermes":
        return HermesToolParser(parallel)
    if name in ("llama3_json", "json_array"):
        return JsonToolParser(name, parallel)
    if name == "named":
        return JsonToolParser("named", parallel, function)
    raise ValueError(f"unknown tool call parser {name!r}; choose from {TOOL_CALL_PARSERS}")

