"""Fake requests for the pure-Python scheduler tests: no model, no torch."""

from __future__ import annotations

import itertools

from rillm.core.request import Request
from rillm.sampling_params import SamplingParams

_ids = itertools.count()


def make_request(
    prompt: list[int] | int, max_tokens: int = 8, request_id: str | None = None
) -> Request:
    prompt_ids = list(range(100, 100 + prompt)) if isinstance(prompt, int) else list(prompt)
    n = next(_ids)
    return Request(
        request_id=request_id or f"req-{n}",
        prompt_token_ids=prompt_ids,
        params=SamplingParams(max_tokens=max_tokens),
        max_tokens=max_tokens,
        seed=n,
        eos_token_ids=frozenset({0}),
        arrival=n,
    )
