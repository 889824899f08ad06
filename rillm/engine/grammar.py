"""Structured outputs on xgrammar: compile a request's constraint once (cached), then follow
each sequence's output with a matcher that says which tokens may come next.

The engine creates one `RequestGrammar` per sequence and hands it to the scheduler's request;
the model runner asks it for the next-token bitmask of the rows it samples, the sampler masks
the logits with that, and the engine feeds the sampled token back (`accept`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import Any

import torch

from rillm.sampling_params import InvalidParameterError
from rillm.structured_outputs import StructuredOutputsParams

_LOCATION = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")
"""xgrammar's messages start with "[time] file.cc:line: "; users need only the rest."""


CACHE_LIMIT_BYTES = 256 * 1024 * 1024
"""xgrammar's cache of compiled grammars, least recently used out first: without a limit every
distinct schema a client sends stays in memory for good."""


class GrammarCompiler:
    """Compiles constraints for one tokenizer; xgrammar is imported and its vocabulary index
    built on first use, so servers that never see a constraint never pay for it."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _xgrammar(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size,
                    stop_token_ids=self._stop_token_ids,
                )
                self._compiler = xgrammar.GrammarCompiler(
                    info, max_threads=2, cache_limit_bytes=CACHE_LIMIT_BYTES)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar (cached by xgrammar); a constraint that does not compile is an
        InvalidParameterError naming the request field it came from."""
        compiler = self._xgrammar()
        kind = spec.kind
        try:
            if kind == "json":
                return compiler.compile_json_schema(str(spec.json), any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(c) for c in spec.choice or ())
                return compiler.compile_grammar(f"root ::= {alternatives}")
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            message = _LOCATION.sub("", str(exc).strip())
            raise InvalidParameterError(spec.field, f"cannot be compiled: {message}") from None

    def matcher(self, spec: StructuredOutputsParams) -> RequestGrammar:
        import xgrammar

        return RequestGrammar(xgrammar.GrammarMatcher(self.compile(spec)), self.vocab_size)


class RequestGrammar:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an int32 CPU bitmask
        [rows, ceil(vocab / 32)] (bit t % 32 of word t // 32 set: token t allowed)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it."""
        return bool(self._matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        """The output is complete: the grammar accepted a stop token."""
        return bool(self._matcher.is_terminated())
