"""Perplexity of the engine's model on a fixed text, for several configurations.

    python -m bench.perplexity                                  # float32 bfloat16 gguf
    python -m bench.perplexity --engines float32 gguf --chunk 1

The text (bench/data/perplexity.txt by default, ~700 tokens) is fed through the engine's model
runner in chunks of --chunk tokens through the paged KV cache, exactly as the engine runs a
prompt; --chunk 1 runs every token as a decode step, the path that serves output tokens.
Reported: perplexity exp(mean NLL of each next token), how many next-token argmaxes agree
with the first configuration's, and the mean KL divergence of each next-token distribution from
the first configuration's.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from bench.engines import make_engine
from rillm.core.request import Request
from rillm.core.scheduler import ScheduledRequest
from rillm.loader import load_model
from rillm.sampling_params import SamplingParams

DEFAULT_TEXT = os.path.join(os.path.dirname(__file__), "data", "perplexity.txt")


def logits_of(engine, tokens: list[int], chunk: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Logits [len(tokens), vocab] of every position, prefilled `chunk` tokens at a time."""
    request = Request("ppl", tokens, SamplingParams(), max_tokens=1, seed=0)
    pieces = []
    while request.num_computed_tokens < len(tokens):
        n = min(chunk, len(tokens) - request.num_computed_tokens)
        assert engine.block_manager.allocate(request, n)
        step = [ScheduledRequest.of(request, n)]
        pieces.append(engine.runner.forward(step, all_tokens=True))
        request.num_computed_tokens += n
    engine.block_manager.free(request)
    return torch.cat(pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--engines", nargs="+",
                        default=["float32", "bfloat16", "gguf"])
    parser.add_argument("--chunk", type=int, nargs="+", default=[1, 256])
    args = parser.parse_args()
    loaded = load_model(args.model)
    with open(args.text, encoding="utf-8") as f:
        tokens = loaded.tokenizer(f.read())["input_ids"]
    target = torch.tensor(tokens[1:])
    print(f"{len(tokens)} tokens from {args.text}")
    print(f"{'engine':>12} {'chunk':>6} {'perplexity':>11} {'argmax agrees':>14} "
          f"{'mean KL':>9}")
    first: torch.Tensor | None = None
    first_log_probs = torch.empty(0)
    for spec in args.engines:
        bench = make_engine(spec, loaded, num_kv_blocks=len(tokens) // 16 + 2)
        bench.activate()
        for chunk in args.chunk:
            logits = logits_of(bench.engine, tokens, chunk)[:-1].float()
            nll = torch.nn.functional.cross_entropy(logits, target).item()
            top = logits.argmax(-1)
            log_probs = torch.log_softmax(logits, -1)
            if first is None:
                first, first_log_probs = top, log_probs
            agree = (top == first).float().mean().item()
            # KL(first engine || this one), per position, averaged: how far the distributions
            # moved, which perplexity (one token's probability) sees only in part.
            kl = (first_log_probs.exp() * (first_log_probs - log_probs)).sum(-1).mean().item()
            print(f"{spec:>12} {chunk:>6} {math.exp(nll):>11.4f} {100 * agree:>13.1f}% "
                  f"{kl:>9.5f}", flush=True)


if __name__ == "__main__":
    main()
