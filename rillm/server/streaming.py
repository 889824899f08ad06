"""What the two generation endpoints stream, before framing (sse.py): the engine's deltas with
keep-alive ticks, batching by stream_interval, logprob entries."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rillm.engine.protocol import ServingEngine
from rillm.outputs import CompletionOutput, Logprob, RequestOutput
from rillm.sampling_params import SamplingParams


async def engine_events(
    engine: ServingEngine,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    request_id: str,
    keepalive_s: float,
) -> AsyncIterator[RequestOutput | None]:
    """The request's deltas; None whenever `keepalive_s` pass without one. Validation errors
    surface on the first iteration. Leaving early aborts the request. `max_tokens`: what the
    engine's `validate` resolved for it."""
    stream = engine.generate(prompt_ids, params, request_id, max_tokens=max_tokens)
    pending: asyncio.Future[RequestOutput] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(stream.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                yield None
                continue
            try:
                output = pending.result()
            except StopAsyncIteration:
                return
            finally:
                if pending.done():
                    pending = None
            yield output
            if output.finished:
                return
    finally:
        # No awaiting here: this may run inside a cancelled scope (client disconnect).
        if pending is not None:
            pending.cancel()
        engine.abort(request_id)


@dataclass(slots=True)
class ChoiceBuffer:
    """What one choice produced since its last event (stream_interval batching)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_sent_events: int = 0
    num_tokens: int = 0

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or ()
        self.num_tokens += len(delta.token_ids)
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason

    def ready(self, interval: int) -> bool:
        """Send now? The first tokens never wait, the last never linger."""
        return (
            self.finish_reason is not None
            or self.num_sent_events == 0
            or len(self.token_ids) >= interval
        )

    def take(self) -> tuple[str, list[int], list[Logprob]]:
        taken = (self.text, self.token_ids, self.logprobs)
        self.text, self.token_ids, self.logprobs = "", [], []
        self.num_sent_events += 1
        return taken


def logprob_entries(tokenizer: Any, logprobs: Sequence[Logprob]) -> list[dict[str, Any]]:
    """Chat-style logprobs content: each token with its text, bytes and top alternatives."""
    entries = []
    for lp in logprobs:
        entries.append({
            **_token_entry(tokenizer, lp.token_id, lp.logprob),
            "top_logprobs": [_token_entry(tokenizer, t, v) for t, v in lp.top],
        })
    return entries


def _token_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": max(logprob, -9999.0),
            "bytes": list(token_bytes(tokenizer, token_id, text))}


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 bytes (GPT-2's scheme, which Llama 3,
    Qwen and SmolLM2 vocabularies use): printable Latin-1 bytes stand for themselves, the
    other 68 for chr(256), chr(257), ... in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable},
            **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_LEVEL = _byte_level_alphabet()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Any, token_id: int, text: str) -> bytes:
    """The token's own bytes. A token that is part of a character (an emoji split over three
    tokens) decodes alone to U+FFFD; its bytes come from its vocabulary entry instead: a
    byte-level BPE piece through BYTE_LEVEL, a SentencePiece byte-fallback piece `<0xF0>`."""
    if "\ufffd" not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if (match := _BYTE_TOKEN.fullmatch(piece)) is not None:
            return bytes([int(match.group(1), 16)])
        if piece and all(char in BYTE_LEVEL for char in piece):
            return bytes(BYTE_LEVEL[char] for char in piece)
    return text.encode()


def token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id], skip_special_tokens=False))
