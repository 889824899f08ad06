"""StructuredOutputsParams: the shape a request's output must take.

Exactly one of `json` (a JSON schema), `json_object` (any JSON object), `regex`, `choice` or
`grammar` (EBNF) is set. The engine compiles it with xgrammar into a token mask applied in the
sampler, so every sampled token keeps the output a prefix of something the constraint accepts.
This module holds only the request-side description (no xgrammar, no torch), so
`SamplingParams` can carry it anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rillm.sampling_params import InvalidParameterError

MAX_CONSTRAINT_CHARS = 65536
"""The longest constraint a request may send (a JSON schema as JSON text, a regex, a grammar,
the choices together): compile time and the compiled grammar's size grow with it."""


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | Mapping[str, Any] | None = None
    """A JSON schema (a dict or its JSON text)."""
    json_object: bool = False
    """Any JSON object."""
    regex: str | None = None
    choice: Sequence[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar (xgrammar's dialect of GBNF) whose start rule is `root`."""
    param: str = "structured_outputs"
    """The request field this came from; compile errors name it."""

    def __post_init__(self) -> None:
        kinds = [self.json is not None, self.json_object, self.regex is not None,
                 self.choice is not None, self.grammar is not None]
        if sum(kinds) != 1:
            raise InvalidParameterError(
                self.param, "set exactly one of json, json_object, regex, choice or grammar")
        if self.choice is not None:
            choice = tuple(self.choice)
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise InvalidParameterError(
                    f"{self.param}.choice", "must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", choice)
        if isinstance(self.json, Mapping):
            object.__setattr__(self, "json", json.dumps(self.json))
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise InvalidParameterError(f"{self.param}.{name}", "must be a non-empty string")
        size = len(self.key[1])
        if size > MAX_CONSTRAINT_CHARS:
            raise InvalidParameterError(
                self.field, f"is {size} characters; at most {MAX_CONSTRAINT_CHARS}")

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    @property
    def field(self) -> str:
        """The request field an error about the constraint names: `structured_outputs.<kind>`,
        or the field it came from (response_format, ...)."""
        if self.param == "structured_outputs":
            return f"{self.param}.{self.kind}"
        return self.param

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar (the compile cache's key)."""
        kind = self.kind
        if kind == "choice":
            return kind, json.dumps(self.choice)
        if kind == "json_object":
            return kind, ""
        return kind, str(getattr(self, kind))
