"""IncrementalDetokenizer: one choice's new token ids → UTF-8-safe text deltas, with stop strings.

Contract, per choice of a request:

- The deltas, concatenated, equal what decoding all output ids at once gives (decoded in the
  context of the prompt's last tokens, so a sentencepiece-style first token keeps its leading
  space; for byte-level BPE that is exactly `tokenizer.decode(output_ids)`).
- A delta never ends inside a UTF-8 character: a token that stops mid-character yields "" until
  the character is complete.
- A delta never holds a stop string or anything after it (unless `include_stop_str_in_output`:
  then text up to and including the stop string, nothing after). The first stop string to be
  completed wins, so the result does not depend on how tokens are grouped into updates.
- Text is held back only while its tail could still grow into a stop string; `finished=True`
  releases everything held back, including an unfinished character (as U+FFFD).
- Work per update is proportional to the new tokens plus the longest stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from rillm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_CONTEXT_TOKENS = 4
"""Prompt tokens the decoder sees before the output: enough for a leading space to survive."""

_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class DetokenizerDelta:
    text: str
    """New text for the client; may be ""."""
    stop_string: str | None = None
    """The stop string just completed: the choice must finish now with finish_reason "stop"."""


class IncrementalDetokenizer:
    """Turns one choice's tokens into text deltas as they arrive (see the module docstring)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | Tokenizer,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        self._tokenizer = _backend(tokenizer)
        self._skip_special = params.skip_special_tokens
        self._stops = params.stop_strings
        self._include_stop = params.include_stop_str_in_output
        self._stream = DecodeStream(skip_special_tokens=self._skip_special)
        self._context: list[int] = []
        """The ids behind the decoder's last chunk: the context for decoding what follows."""
        self._undecoded: list[int] = []
        """Ids fed since the decoder's last chunk (an unfinished character)."""
        self._held = ""
        """Decoded text not emitted yet: the tail that may still become a stop string."""
        self._pieces: list[str] = []
        self._done = False
        self._prime(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])

    @property
    def output_text(self) -> str:
        """All text emitted so far: what the client has seen."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def update(self, new_token_ids: Sequence[int], *, finished: bool = False) -> DetokenizerDelta:
        """Feed the choice's new tokens; `finished` says no more will come, so flush everything.

        After a stop string matched or a finished update, further calls return empty deltas.
        """
        if self._done:
            return DetokenizerDelta("")
        text = self._held + "".join(self._step(token_id) for token_id in new_token_ids)
        if finished:
            text += self._flush()
            self._done = True
        return self._emit(text, finished)

    def _prime(self, context_ids: Sequence[int]) -> None:
        # A context that ends mid-character would make the first output token complete a
        # character that belongs to the prompt; without context the output decodes on its own.
        context = list(context_ids)
        if not context or self._decode(context).endswith(_REPLACEMENT_CHAR):
            return
        for token_id in context:
            self._step(token_id)

    def _step(self, token_id: int) -> str:
        chunk = self._stream.step(self._tokenizer, token_id)
        self._undecoded.append(token_id)
        if chunk is None:
            return ""
        self._context, self._undecoded = self._undecoded, []
        return chunk

    def _flush(self) -> str:
        """Decode what the stream still buffers (an unfinished character) as a full decode would."""
        if not self._undecoded:
            return ""
        before = self._decode(self._context)
        after = self._decode(self._context + self._undecoded)
        tail = after[len(before) :] if after.startswith(before) else self._decode(self._undecoded)
        self._context, self._undecoded = [], []
        return tail

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special)

    def _emit(self, text: str, finished: bool) -> DetokenizerDelta:
        match = _first_stop(text, self._stops)
        if match is not None:
            start, stop = match
            end = start + len(stop) if self._include_stop else start
            self._held = ""
            self._done = True
            return self._push(text[:end], stop)
        held = 0 if finished else _partial_stop_length(text, self._stops)
        self._held = text[len(text) - held :]
        return self._push(text[: len(text) - held], None)

    def _push(self, text: str, stop_string: str | None) -> DetokenizerDelta:
        if text:
            self._pieces.append(text)
        return DetokenizerDelta(text, stop_string)


def _backend(tokenizer: PreTrainedTokenizerBase | Tokenizer) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(
            f"incremental detokenizing needs a fast tokenizer, got {type(tokenizer).__name__}"
        )
    return backend


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """The stop string in `text` that is completed first (ties: the one starting first).

    `text` starts where no stop string can begin earlier (emitted text never holds part of one),
    so it is only the held-back tail plus the new text.
    """
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start != -1:
            candidate = (start + len(stop), start, stop)
            if best is None or candidate < best:
                best = candidate
    return None if best is None else (best[1], best[2])


def _partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        if len(stop) == 1:
            continue
        tail = text[-(len(stop) - 1) :]
        # The earliest place the stop string's first character occurs gives the longest prefix.
        start = tail.find(stop[0])
        while start != -1 and len(tail) - start > longest:
            if stop.startswith(tail[start:]):
                longest = len(tail) - start
                break
            start = tail.find(stop[0], start + 1)
    return longest
