"""Feeding parsers the way the server does: the real tokenizer's per-token text deltas,
grouped into events of any size."""

from __future__ import annotations

from collections.abc import Callable, Iterable


def token_pieces(tokenizer, text: str) -> list[str]:
    """`text` as the detokenizer streams it: one delta per token (ASCII text, so no token
    holds part of a character)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:end])
        pieces.append(decoded[len(previous):])
        previous = decoded
    assert "".join(pieces) == text
    return pieces


def grouped(pieces: list[str], size: int) -> list[str]:
    """Deltas of `size` tokens per event (stream_interval)."""
    return ["".join(pieces[i : i + size]) for i in range(0, len(pieces), size)]


def chunkings(tokenizer, text: str) -> Iterable[tuple[str, list[str]]]:
    """Every way the tests split a text: whole, per token, 2/4/7 tokens per event, per char."""
    pieces = token_pieces(tokenizer, text)
    yield "whole", [text]
    yield "tokens", pieces
    for size in (2, 4, 7):
        yield f"{size} tokens", grouped(pieces, size)
    yield "chars", list(text)


def feed_all(feed: Callable[[str], object], finish: Callable[[], object],
             chunks: list[str]) -> list[object]:
    return [feed(chunk) for chunk in chunks] + [finish()]
