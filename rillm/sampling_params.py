"""SamplingParams: how one request picks its tokens and when it stops.

Validated on construction: a bad value raises ValueError naming the parameter, which the
server turns into a 400. Checks that need the model (vocabulary size, context length) happen
when the engine admits the request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rillm.structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20
"""The most top logprobs one request may ask for (OpenAI's limit)."""

MAX_N = 128
"""The most choices one request may ask for (OpenAI's limit)."""

MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 1024
"""Stop strings a request may give, and the longest: every one is looked for in the text of
every step, so together they bound that scan's cost per token."""

MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
"""Entries of `stop_token_ids` and of `logit_bias`: what a request may make each of its steps
carry besides the model."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 (or -1) keeps the whole vocabulary."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    """None: until the context is full."""
    min_tokens: int = 0
    stop: Sequence[str] | str | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """None: no logprobs. k >= 0: the sampled token's logprob plus the top k."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output (JSON schema, regex, choice, grammar); the grammar decides when
    it may end, so EOS is never banned on such a request (min_tokens, ignore_eos)."""
    stop_strings: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop_strings", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.logit_bias is not None:
            object.__setattr__(
                self, "logit_bias", {int(k): float(v) for k, v in self.logit_bias.items()}
            )
        self._validate()

    def _validate(self) -> None:
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            _check(math.isfinite(value), name, f"must be a finite number, got {value}")
        _check(
            isinstance(self.n, int) and 1 <= self.n <= MAX_N,
            "n",
            f"must be between 1 and {MAX_N}, got {self.n}",
        )
        _check(
            self.temperature >= 0.0, "temperature", f"must be non-negative, got {self.temperature}"
        )
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(
            self.top_k == -1 or self.top_k >= 0,
            "top_k",
            f"must be -1 (disabled), 0 (disabled) or at least 1, got {self.top_k}",
        )
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(
            -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            f"must be in [-2, 2], got {self.presence_penalty}",
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            f"must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(
            self.repetition_penalty > 0.0,
            "repetition_penalty",
            f"must be positive, got {self.repetition_penalty}",
        )
        _check(
            self.max_tokens is None or self.max_tokens >= 1,
            "max_tokens",
            f"must be at least 1, got {self.max_tokens}",
        )
        _check(self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}",
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop_strings),
            "stop",
            "stop strings must be non-empty strings",
        )
        _check(
            len(self.stop_strings) <= MAX_STOP_STRINGS,
            "stop",
            f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop_strings)}",
        )
        _check(
            all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop_strings),
            "stop",
            f"a stop string may be at most {MAX_STOP_STRING_CHARS} characters",
        )
        _check(
            len(self.stop_token_ids or ()) <= MAX_STOP_TOKEN_IDS,
            "stop_token_ids",
            f"at most {MAX_STOP_TOKEN_IDS} token ids, got {len(self.stop_token_ids or ())}",
        )
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids or ()),
            "stop_token_ids",
            "must be non-negative token ids",
        )
        if self.logit_bias:
            _check(
                len(self.logit_bias) <= MAX_LOGIT_BIAS,
                "logit_bias",
                f"at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}",
            )
            for token_id, bias in self.logit_bias.items():
                _check(token_id >= 0, "logit_bias", f"token id {token_id} is negative")
                _check(
                    -100.0 <= bias <= 100.0,
                    "logit_bias",
                    f"bias for token {token_id} must be in [-100, 100], got {bias}",
                )
        _check(
            self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**63),
            "seed",
            "must be a 64-bit integer",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class InvalidParameterError(ValueError):
    """A request parameter with a bad value; `param` names it (the server's 400 carries it)."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message
        self.code = code
        """OpenAI's error code where it has one (context_length_exceeded)."""

    def __reduce__(self) -> tuple:
        # Crosses processes whole (an engine replica raises it, the server answers the 400).
        return (type(self), (self.param, self.message, self.code))


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidParameterError(param, message)
