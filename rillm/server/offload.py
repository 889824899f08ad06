"""Work whose size a request decides runs off the event loop once it is large.

Tokenizing 8 MiB of text (the body bound) takes ~5 s on this 2-core machine: on the event loop
that is 5 s without a token for every other stream and without a /health answer. Small inputs
stay inline, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

INLINE_CHARS = 16384
"""Text up to this many characters is tokenized on the event loop (~10 ms at most)."""
INLINE_TOKENS = 16384
"""Token ids up to this many are decoded on the event loop."""


async def off_loop(large: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs): on a worker thread where `large`, else here."""
    if not large:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


async def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(await off_loop(len(text) > INLINE_CHARS, tokenizer.encode, text,
                               add_special_tokens=add_special_tokens))


async def encode_all(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    def run() -> list[list[int]]:
        return [list(tokenizer.encode(text)) for text in texts]

    return await off_loop(sum(len(t) for t in texts) > INLINE_CHARS, run)


async def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return str(await off_loop(len(ids) > INLINE_TOKENS, tokenizer.decode, list(ids)))
