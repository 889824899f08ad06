"""merge_all: a request's deltas joined at once equal the pairwise merge in order (what the
mailboxes, the non-streaming responses and the offline API rely on)."""

from __future__ import annotations

import functools
import random

from rillm.outputs import CompletionOutput, Logprob, RequestOutput, merge_all, merge_outputs


def deltas(seed: int, count: int) -> list[RequestOutput]:
    rng = random.Random(seed)
    out = []
    for step in range(count):
        choices = []
        for index in rng.sample(range(3), rng.randint(1, 3)):
            token = rng.randrange(1000)
            logprobs = (Logprob(token, -rng.random(), 1),) if rng.random() < 0.5 else None
            last = step == count - 1
            choices.append(CompletionOutput(
                index=index, text=rng.choice(["a", "é", " 日", "", "\n"]), token_ids=(token,),
                logprobs=logprobs, finish_reason="length" if last else None,
                stop_reason=None))
        out.append(RequestOutput(request_id="r", prompt_token_ids=(1, 2),
                                 outputs=tuple(choices), finished=step == count - 1,
                                 num_cached_tokens=step))
    return out


def test_merge_all_equals_the_pairwise_merge():
    for seed in range(50):
        pieces = deltas(seed, random.Random(seed).randint(1, 40))
        assert merge_all(pieces) == functools.reduce(merge_outputs, pieces)
